#!/usr/bin/env bash
# Where `import ldmkit.pipeline` spends its time on the device (issue 5's warm start): per top-level package,
# the sum of self times from python -X importtime, for three runs in a row (the first may write bytecode).
# The device sets PYTHONDONTWRITEBYTECODE=1; a user's install has bytecode, so cache it (as device_warm_start.sh does).
export PYTHONPATH=${PYTHONPATH:-src} PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONDONTWRITEBYTECODE=
for run in 1 2 3; do
  start=$(date +%s.%N)
  python3 -X importtime -c "import torch, ldmkit.pipeline, ldmkit.cli" 2>/tmp/importtime.txt
  echo "run $run: $(python3 -c "import time; print(round(time.time() - $start, 2))") s"
done
for what in "import torch" "import torch; torch.zeros(1, device=\"cuda\")"; do
  start=$(date +%s.%N); python3 -c "$what"; echo "$what: $(python3 -c "import time; print(round(time.time() - $start, 2))") s"
done
python3 - <<'PY'
import collections
totals = collections.Counter()
for line in open("/tmp/importtime.txt"):
    if line.startswith("import time:") and "self" not in line:
        _, self_us, _, name = (part.strip() for part in line.replace("import time:", "|").split("|"))
        totals[name.split(".")[0]] += int(self_us)
print({k: round(v / 1e6, 2) for k, v in totals.most_common(14)})
PY
awk -F'|' '/^import time:/ && !/self/ {split($1, a, ":"); print a[2] + 0, $3}' /tmp/importtime.txt | sort -n -r | head -20  # slowest modules by self time
