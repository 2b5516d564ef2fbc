#!/usr/bin/env bash
# One call on a lent CUDA machine that has neither internet nor ../shared, the repository carried there with
# .offline/ (offline_bundle.sh pack): unpack, train the GPU recipe for MINUTES (train_on_gpu.sh, warm-started
# from the bundled model), then time segmentation on the GPU (Testing/benchmark.py).
#   Resources/Training/gpu_session.sh MINUTES DEST
# DEST gets best.safetensors (+ .sha256), log.csv, curves.png, train.log and benchmark.txt. The weights and
# the log are copied there every 30 s as well, so a call cut off at its time limit still brings back the best
# weights so far. Calibrate and evaluate them afterwards on any machine (train_on_gpu.sh's last lines).
# DEVICE=cpu rehearses the script on a machine without a GPU (give it 1 MINUTE).
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${1:?usage: gpu_session.sh MINUTES DEST}
DEST=${2:?usage: gpu_session.sh MINUTES DEST}
RUN=/tmp/gpu-session-run
export PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda}
mkdir -p "$DEST"
eval "$(bash Resources/Training/offline_bundle.sh unpack)"

collect() {  # each file under a temporary name first: DEST never holds a half-copied file
  for name in best.safetensors best.safetensors.sha256 log.csv curves.png; do
    if [ -f "$RUN/$name" ]; then cp "$RUN/$name" "$DEST/$name.part" && mv "$DEST/$name.part" "$DEST/$name"; fi
  done
}
(while sleep 30; do collect; done) &
COLLECTOR=$!
trap 'kill $COLLECTOR 2>/dev/null; collect' EXIT

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$DEST/train.log"
RUN=$RUN SCORE=0 bash Resources/Training/train_on_gpu.sh 100000 "$MINUTES" 2>&1 | tee -a "$DEST/train.log"
collect
timeout 150 python3 Testing/benchmark.py --device "$DEVICE" --threads 8 --weights "$RUN/best.safetensors" \
  2>&1 | tee "$DEST/benchmark.txt"
