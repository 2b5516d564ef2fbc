#!/usr/bin/env bash
# One command on a CUDA machine: train the bundled recipe (gpu.train.yaml), warm-started from the bundled
# model, then score the result. Run it again to continue where it stopped (checkpoints in $RUN).
#   Resources/Training/train_on_gpu.sh [STEPS] [MINUTES]
# Needs: a CUDA build of torch, this repository installed (pip install -e .) or its packages on PYTHONPATH,
# ../shared/labelmaps and ../shared/data beside it (or ATTENTION_UNET_SEG_SHARED); offline_bundle.sh packs
# the data and the missing packages for a machine without internet. Writes $RUN/best.safetensors,
# curves.png, log.csv, $RUN/calibration*/ (the verdict's thresholds, without and with TTA) and
# $RUN/evaluation/ (tables); SCORE=0 skips those two (score on any machine later, with the same commands).
# Nothing is copied into the repository: commit the weights by hand if they beat the bundled model on the
# evaluation, with the thresholds calibrated for them. DEVICE=cpu rehearses the whole script on a machine
# without a GPU (slowly: try it with a few STEPS).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-$HOME/.cache/attention-unet-seg/runs/gpu}
STEPS=${1:-20000}
MINUTES=${2:-0}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEG=("$PYTHON" -m AttentionUNetSegTools.cli)  # the console script's module: works installed or from source
[ "$DEVICE" != cuda ] || "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device; train_on_gpu.sh needs a GPU; use the CPU config in AttentionUNetSeg/Resources/Models/')"
mkdir -p "$RUN"
sed -e "s/^time_limit_minutes: .*/time_limit_minutes: $MINUTES/" -e "s/^device: .*/device: $DEVICE/" Resources/Training/gpu.train.yaml > "$RUN/gpu.train.yaml"
RESUME=()
[ -f "$RUN/last.optimizer.pt" ] && RESUME=(--resume)
"${SEG[@]}" train "$RUN/gpu.train.yaml" --steps "$STEPS" --output-dir "$RUN" "${RESUME[@]}"
[ "${SCORE:-1}" = 0 ] && exit 0
for TTA in --no-tta --tta; do  # the verdict's thresholds for these weights (OK_CONFIDENCE[_TTA] in verdict.py)
  "${SEG[@]}" calibrate --weights "$RUN/best.safetensors" $TTA --device "$DEVICE" --output-dir "$RUN/calibration$TTA"
done
"${SEG[@]}" evaluate --weights "$RUN/best.safetensors" --synthetic 25 --negatives 10 --device "$DEVICE" \
  --output-dir "$RUN/evaluation"
