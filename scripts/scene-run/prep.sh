#!/bin/bash
# Shape the working tree for device call N (a call carries at most 64 MiB); 0 restores it.
#   1: the shipped VAE and text encoder stay   2: the shipped UNet stays   3: no shipped weights
# Every checkpoints/NAME folder loses its weights unless NAME is listed after N (e.g. `prep.sh 3 scene-unet`).
cd "$(git rev-parse --show-toplevel)" || exit 1
RESTORED=(src/ldmkit/assets docs checkpoints)
# It restores these folders from git (deletions are its own): edits or new files there would be lost, so refuse.
if ! git diff --quiet --diff-filter=M -- "${RESTORED[@]}" ||
  [ -n "$(git ls-files --others --exclude-standard -- "${RESTORED[@]}")" ]; then
  echo "prep.sh: uncommitted edits or new files in ${RESTORED[*]}; commit them first" >&2
  exit 1
fi
git checkout -- "${RESTORED[@]}"
[ "$1" = 0 ] && exit 0
M=src/ldmkit/assets/default-model
rm -f docs/*.png docs/*.jpg docs/*.webp
rm -rf $M/controlnets
case $1 in
  1) rm -f $M/unet/*.safetensors ;;
  2) rm -f $M/vae/*.safetensors $M/text_encoder/*.safetensors ;;
  3) rm -f $M/unet/*.safetensors $M/vae/*.safetensors $M/text_encoder/*.safetensors ;;
  *) echo "prep.sh: N is 0, 1, 2 or 3" >&2; exit 2 ;;
esac
shift
for folder in checkpoints/*/; do
  name=$(basename "$folder")
  [[ " $* " == *" $name "* ]] || rm -f "$folder"*.safetensors
done
for name in "$@"; do
  [ -d "checkpoints/$name" ] || { echo "prep.sh: no checkpoints/$name" >&2; exit 2; }
done
echo "tracked files left: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
