#!/usr/bin/env bash
# Two fresh `--fast` processes on the SD1.5-shaped random model with ldmkit.precompile's log shown (issue 5):
# the first compiles and saves, the second should load. Phase times from scripts/device_warm_start.py.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src} PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONDONTWRITEBYTECODE=
export LDMKIT_COMPILE_CACHE=/tmp/ldmkit-compiled
python3 scripts/save_random_sd15.py /tmp/sd15 2>&1 | grep -v shards
for run in 1 2; do
  echo "== process $run"
  python3 scripts/device_warm_start.py /tmp/sd15 2>&1 | grep -v "Warn\|warn\|Loading\|torchvision" | tail -${TAIL:-40}
done
ls -la "$LDMKIT_COMPILE_CACHE"
# Whole warm commands, as a user types them, on the cache the processes above filled.
for run in 1 2; do
  start=$(date +%s.%N)
  python3 -m ldmkit.cli generate "a castle on a hill" --model /tmp/sd15 --fast --size 512x512 --steps 50 --sampler DDIM \
    --seed 1 -q -o /tmp/img-warm > /dev/null 2>/tmp/cli-stderr.txt || tail -3 /tmp/cli-stderr.txt
  echo "warm command $run: $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
done
ls /tmp/img-warm
# ldm bench on the same cache: ours-fast's first image is then a warm start inside one process.
if [ "${BENCH:-1}" = 1 ]; then
  timeout 200 python3 -m ldmkit.bench --model /tmp/sd15 --rows diffusers,ours-fast --batch 1 --size 512 --steps 50 \
    --sampler DDIM --warmup 1 --repeats 3 2>&1 | grep -v "Loading\|Warn\|warn" | tail -6
fi
