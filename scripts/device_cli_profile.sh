#!/usr/bin/env bash
# Where a warm-cache `ldm generate --fast` spends its time (issue 5): fill the compile cache once, then an
# import-time log and a cProfile of one more whole command, both written to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
OUT=${OUT:-probe-out}
mkdir -p "$OUT"
python3 scripts/save_random_sd15.py /tmp/sd15 2>&1 | grep -v shards
GEN=(generate "a castle on a hill" --model /tmp/sd15 --fast --size 512x512 --steps 50 --sampler DDIM --seed 1 -q)
for run in cold warm; do
  start=$(date +%s.%N)
  python3 -m ldmkit.cli "${GEN[@]}" -o /tmp/img-$run > /dev/null 2>>"$OUT/stderr.txt" || tail -3 "$OUT/stderr.txt"
  echo "whole command, $run cache: $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
done
python3 -X importtime -c "import ldmkit.cli, ldmkit.pipeline, ldmkit.distributed, ldmkit.job" 2> "$OUT/importtime.txt"
sort -t'|' -k2 -n -r "$OUT/importtime.txt" | head -30
start=$(date +%s.%N)
python3 -m cProfile -o "$OUT/cli.prof" -m ldmkit.cli "${GEN[@]}" -o /tmp/img-prof > /dev/null 2>>"$OUT/stderr.txt"
echo "whole command under cProfile: $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
python3 -c "
import pstats; pstats.Stats('$OUT/cli.prof').sort_stats('cumulative').print_stats(45)" | tail -60
