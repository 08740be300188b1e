# Call 1 when resuming an earlier run (its eval CLIP and decoder-tuned VAE kept here): only the wheels, the 256 px
# sprites and the shipped VAE and text encoder in .runs/base for the later calls.
source scripts/scene-run/env.sh
set -x
nvidia-smi --query-gpu=name,memory.used --format=csv
mkdir -p .runs/base && cp -r src/ldmkit/assets/default-model/. .runs/base/
time ldm data emoji --out .data/emoji --cache .dev/a/npm --resolution 256 --workers 16 2>&1 | tail -3
ls -la .runs/base/*
