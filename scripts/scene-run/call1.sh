# Call 1: 256 px sprites; the framed eval CLIP and the decoder-tuned VAE side by side; the shipped VAE and text
# encoder kept in .runs/base for the later calls, which carry no weights but the UNet.
source scripts/scene-run/env.sh
set -x
mkdir -p .runs/base && cp -r src/ldmkit/assets/default-model/. .runs/base/
ldm data emoji --out .data/emoji --cache .dev/a/npm --resolution 256 --workers 16
(ldm train clip --minutes 1.2 --set max_steps=100000 --set 'framing=[0.6,1.15]' > $OUT/clip.txt 2>&1) &
ldm train vae --minutes 1.6 --set max_steps=1000000 --set init_dir=.runs/base/vae --set decoder_only=true \
  --set scenes=true --set scene_size=256 --set batch_size=128 --set lr=2e-4 --set warmup_steps=50 --set workers=10 \
  > $OUT/vae.txt 2>&1
wait
tar cf /tmp/clip.tar -C .runs/clip clip && ret /tmp/clip.tar clip
cp .runs/vae/vae/*.safetensors .runs/vae/vae/config.json $OUT/
