#!/usr/bin/env bash
# Medusa benchmark on a CUDA machine, one command: offline (every method) then online.
#
#   pip install -e '.[gpu,dev]'
#   bash bench/gpu.sh [MODEL] [HEADS] [extra bench/offline.py flags...]
#
# MODEL and HEADS are Hugging Face repos or local folders; defaults: lmsys/vicuna-7b-v1.3 with
# FasterDecoding/medusa-vicuna-7b-v1.3 (5 heads, own projections, no tree.json, so the published
# mc_sim_7b_63 tree is the base tree). Results: bench/results/$NAME/, copies in bench/latest-gpu/.
# Environment: PYTHON (default python), NAME (results folder), RATES (online, req/s).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-lmsys/vicuna-7b-v1.3}
HEADS=${2:-FasterDecoding/medusa-vicuna-7b-v1.3}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python}
NAME=${NAME:-gpu-$(basename "$MODEL")-$(date +%Y%m%d-%H%M%S)}
RATES=${RATES:-1,2,4,8,16}

# The plugin wants local folders (it reads the heads' files itself); vLLM reuses the same HF cache.
fetch() {
  if [ -d "$1" ]; then echo "$1"; return; fi
  "$PY" - "$1" <<'EOF'
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt", "*.model", "*.txt"]))
EOF
}
MODEL_DIR=$(fetch "$MODEL")
HEADS_DIR=$(fetch "$HEADS")

"$PY" bench/offline.py --model "$MODEL_DIR" --heads "$HEADS_DIR" --tree mc_sim_7b_63 --name "$NAME" \
  --methods plain,medusa_chain,ngram,tree-4,tree-8,tree-16,tree-mc_sim_7b_63,adaptive \
  --latest bench/latest-gpu "$@"
"$PY" bench/online.py --model "$MODEL_DIR" --heads "$HEADS_DIR" --tree mc_sim_7b_63 --name "$NAME" \
  --rates "$RATES" --num-requests 128 --latest bench/latest-gpu
