#!/usr/bin/env bash
# The whole `ldm bench` table on a lent GPU, in one device call (see docs/benchmarks.md).
#
# Run through the device tool from the repo root, with diffusers' wheel carried in .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit; bash scripts/device_bench.sh
# Arguments, if any, replace the bench's (default: the full table below); TIME_LIMIT (s) caps the bench.
# Writes table.md, bench.json and log.txt to $OUT (or ./bench-out) and prints the table last.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  nproc
} 2>&1 | tee "$OUT/env.txt"

# Ordered so that a kill at the time limit still leaves the main rows in table.md.
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--size 512 --steps 50 --sampler DDIM --batch 1 --warmup 2 --repeats 5 --ablations)
timeout "${TIME_LIMIT:-530}" python3 -m ldmkit.bench "${ARGS[@]}" --out "$OUT/table.md" --json "$OUT/bench.json" 2>&1 | tee "$OUT/log.txt"
echo "bench exit: ${PIPESTATUS[0]}"
echo
cat "$OUT/env.txt" "$OUT/table.md"
