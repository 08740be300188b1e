#!/usr/bin/env bash
# Where a warm `ldm generate --fast` spends its 20 s (issue 5): whole commands timed, a timeline of one warm
# start (scripts/device_warm_timeline.py), then one command under cProfile.
# SD1.5-shaped random fp16 weights; the first command fills ldmkit's compile cache (cold), later ones load it.
# Env: SIZE (default 512), PROFILE=0 skips the cProfile run. Writes $OUT/warm.prof when OUT is set.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src} PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONDONTWRITEBYTECODE=
export LDMKIT_COMPILE_CACHE=${LDMKIT_COMPILE_CACHE:-/tmp/ldmkit-compiled}
size=${SIZE:-512}
now() { python3 -c "import time; print(time.time())"; }
since() { python3 -c "import time; print(round(time.time() - $1, 1))"; }
[ -d /tmp/sd15 ] || python3 scripts/save_random_sd15.py /tmp/sd15 2>&1 | grep -v shards
generate() {
  python3 "$@" -m ldmkit.cli generate "a castle on a hill" --model /tmp/sd15 --fast --size ${size}x${size} --steps 50 \
    --sampler DDIM --seed 1 -q -o /tmp/img-warm > /dev/null 2>/tmp/cli-stderr.txt || tail -3 /tmp/cli-stderr.txt
}
start=$(now); python3 -c pass; echo "python3 -c pass: $(since $start) s"
start=$(now); python3 -c "import torch; torch.zeros(1, device='cuda')"; echo "import torch + CUDA init: $(since $start) s"
for run in cold warm1 warm2 warm3; do
  start=$(now); generate; echo "ldm generate --fast ($run): $(since $start) s"
done
# The same warm start split into its steps, in this environment (same caches, same bytecode).
python3 scripts/device_warm_timeline.py /tmp/sd15 "$size" 2>&1 | grep -A30 RESULT
if [ "${PROFILE:-1}" = 1 ]; then
  prof=${OUT:-/tmp}/warm.prof
  start=$(now); generate -m cProfile -o "$prof"; echo "ldm generate --fast under cProfile: $(since $start) s"
  python3 - "$prof" <<'EOF'
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("cumulative").print_stats(70)
stats.sort_stats("tottime").print_stats(25)
EOF
fi
