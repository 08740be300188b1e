#!/usr/bin/env bash
# Issue 5 probes, one device call: AOTInductor artifacts (compile, then load in a fresh process) for the
# shipped model's UNet in three packagings, then the warm-start breakdown of the torch.compile path.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
OUT=${OUT:-probe-out}
DEFAULT=src/ldmkit/assets/default-model
for v in ${VARIANTS:-nosoweights blob inso}; do
  timeout 150 python3 scripts/device_aoti_probe.py compile $v $DEFAULT 2>&1 | grep "RESULT\|Error\|error:" | tail -3
  timeout 60 python3 scripts/device_aoti_probe.py load $v $DEFAULT 2>&1 | grep "RESULT\|Error\|error:\|loaded" | tail -3
  echo "load $v exit ${PIPESTATUS[0]}"
done
if [ -n "${WARM_START:-1}" ]; then
  python3 - <<'PY'
import torch
from ldmkit.bench import random_sd15
from ldmkit.loading import save_pretrained
components = random_sd15(torch.device("cuda"))
for module in (components.unet, components.vae, components.text_encoder):
    module.half()
save_pretrained(components, "/tmp/sd15")
PY
  for run in cold warm; do
    echo "== $run"
    timeout 200 python3 scripts/device_warm_start.py /tmp/sd15 > /tmp/warm-$run.log 2>&1
    grep -a "RESULT\|Error" /tmp/warm-$run.log; grep -a "^_compile.compile_inner\|^OutputGraph.call_user\|^bytecode_tracing\|^build_guards\|CUDAGraphNode.record" /tmp/warm-$run.log
  done
  start=$(date +%s.%N)
  python3 -m ldmkit.cli generate "a castle on a hill" --model /tmp/sd15 --fast --size 512x512 --steps 50 \
    --sampler DDIM --seed 1 -o /tmp/first-image -q > /dev/null 2>>/tmp/first-image.log || tail -5 /tmp/first-image.log
  echo "whole ldm generate --fast command, warm cache: $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
fi
