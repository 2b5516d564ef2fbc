#!/usr/bin/env bash
# Training on a CUDA machine that has PyTorch but neither internet nor ../shared (a lent GPU box, a cluster
# node): pack what it lacks here, carry the repository with .offline/ in it, unpack there.
#   here:  Resources/Training/offline_bundle.sh pack
#          -> .offline/ (git-ignored, about 45 MB): the label maps and the real cases of ../shared (label maps
#          recompressed with xz: 0.3 of their gzip size), SimpleITK and MONAI for Python 3.12 (the two
#          packages such images lack; the versions of this venv)
#   there: eval "$(Resources/Training/offline_bundle.sh unpack)"
#          -> unpacked under /tmp/offline; prints the exports (PYTHONPATH, ATTENTION_UNET_SEG_SHARED) for
#          Resources/Training/train_on_gpu.sh, which runs from the source tree without an install
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=.offline
UNPACKED=/tmp/offline

version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }

pack() {
  local shared=${ATTENTION_UNET_SEG_SHARED:-../shared}
  [ -d "$shared/labelmaps" ] && [ -d "$shared/data" ] || {
    echo "error: no labelmaps/ and data/ under $shared; set ATTENTION_UNET_SEG_SHARED to the shared data folder" >&2; exit 2; }
  [ -x .venv/bin/python ] || { echo "error: no .venv here; run 'bash .ci/setup' first (the bundle takes its package versions)" >&2; exit 2; }
  work=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/site" "$work/labelmaps" "$work/bundle"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" "simpleitk==$(version simpleitk)" "monai==$(version monai)"
  for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
  tar -cJf "$work/bundle/site.tar.xz" -C "$work/site" .
  cp -r "$shared/labelmaps/." "$work/labelmaps"
  gunzip -r "$work/labelmaps"  # xz over the raw voxels compresses far better than over gzip's output
  XZ_OPT=-T0 tar -cJf "$work/bundle/labelmaps.tar.xz" -C "$work/labelmaps" .
  tar -cJf "$work/bundle/data.tar.xz" -C "$shared/data" ts-abdomen-3mm ts-venous-dicom
  rm -rf "$BUNDLE" && mv "$work/bundle" "$BUNDLE"  # whole or not at all: a failed pack leaves the old bundle
  du -sh "$BUNDLE"
}

unpack() {
  [ -f "$BUNDLE/site.tar.xz" ] || { echo "error: no $BUNDLE/ here; run 'offline_bundle.sh pack' where ../shared is" >&2; exit 2; }
  mkdir -p "$UNPACKED/site" "$UNPACKED/shared/labelmaps" "$UNPACKED/shared/data"
  tar -xJf "$BUNDLE/site.tar.xz" -C "$UNPACKED/site" & local site=$!
  tar -xJf "$BUNDLE/data.tar.xz" -C "$UNPACKED/shared/data" & local data=$!
  tar -xJf "$BUNDLE/labelmaps.tar.xz" -C "$UNPACKED/shared/labelmaps"
  # The catalog reads .nii.gz; -f: unpacking again replaces what an earlier unpack left.
  find "$UNPACKED/shared/labelmaps" -name '*.nii' -print0 | xargs -0 -P "$(nproc)" -n 4 gzip -1 -f
  wait "$site" && wait "$data"  # a bare 'wait' would report success whatever the two tars did
  echo "export PYTHONPATH=$UNPACKED/site:$PWD/AttentionUNetSeg\${PYTHONPATH:+:\$PYTHONPATH} ATTENTION_UNET_SEG_SHARED=$UNPACKED/shared"
}

case "${1:-}" in
  pack) pack ;;
  unpack) unpack ;;
  *) echo "usage: $0 pack|unpack" >&2; exit 2 ;;
esac
