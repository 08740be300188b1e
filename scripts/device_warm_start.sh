#!/usr/bin/env bash
# First image of `ldm generate --fast` in fresh processes (issue 5), whole commands timed:
#   1 cold: empty inductor cache (and, on the device image, no bytecode cache for its site-packages);
#   2, 3 warm: inductor's on-disk cache filled by run 1, and Python's bytecode cache too: the device image
#     sets PYTHONDONTWRITEBYTECODE=1, so without this every process compiles ~2,600 modules from source
#     (8.6 s in a cProfile), which a normal install does not.
# (TORCH_CACHING_PRECOMPILE=1, dynamo's experimental cache of traced bytecode, was tried on torch 2.11 and
# failed with an AssertionError in the first process; ldmkit.precompile uses torch's explicit AOT precompile
# instead, in LDMKIT_COMPILE_CACHE.) Then `ldm bench` at batch BENCH_BATCH (8) over ROWS, with fresh caches
# so the first-image times are cold ones, unless BENCH_BATCH=0.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src} PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONDONTWRITEBYTECODE=
export LDMKIT_COMPILE_CACHE=/tmp/ldmkit-compiled
python3 -c "import sys, os, torch; print('dont_write_bytecode', sys.dont_write_bytecode, 'torch dir writable', os.access(os.path.dirname(torch.__file__), os.W_OK))"
env | grep -i "^python" || true
python3 scripts/save_random_sd15.py /tmp/sd15 2>&1 | grep -v shards
GEN=(generate "a castle on a hill" --model /tmp/sd15 --fast --size 512x512 --steps 50 --sampler DDIM --seed 1 -q)
timed() {  # label, then env assignments for the command
  local label=$1; shift
  local start; start=$(date +%s.%N)
  env "$@" python3 -m ldmkit.cli "${GEN[@]}" -o "/tmp/img-$label" > /dev/null 2>>/tmp/stderr.txt || tail -3 /tmp/stderr.txt
  echo "$label: $(python3 -c "import time; print(round(time.time() - $start, 1))") s, $(ls /tmp/img-$label | grep -c png) png"
}
timed 1-cold X=1
timed 2-warm X=1
timed 3-warm X=1
ls -la "$LDMKIT_COMPILE_CACHE"
BENCH_BATCH=${BENCH_BATCH:-8}
if [ "$BENCH_BATCH" != 0 ]; then
  LDMKIT_COMPILE_CACHE=/tmp/bench-compiled TORCHINDUCTOR_CACHE_DIR=/tmp/bench-inductor timeout "${BENCH_TIMEOUT:-330}" \
    python3 -m ldmkit.bench --model /tmp/sd15 --rows "${ROWS:-diffusers,ours-fast,diffusers-compiled}" --batch "$BENCH_BATCH" \
    --size 512 --steps 50 --sampler DDIM --warmup 1 --repeats 3 2>&1 | grep -v "Loading\|Warn\|warn" | tail -12
fi
