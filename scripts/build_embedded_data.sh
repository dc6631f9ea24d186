#!/usr/bin/env bash
# Build the embedded datasets (offline) into latent shards: WebDataset tars first, then the same
# sharding pipeline real data goes through, with captions from the tars and the identity VAE.
#   scripts/build_embedded_data.sh [OUT_DIR]   (default outputs/data; about 2.5 minutes on 2 cores)
# Writes OUT/<dataset>-<size>/tars and, per kind, OUT/<dataset>-<size>/shards-text (captions) and
# shards-labels (class labels). Reruns skip what is done (both steps resume).
# Environment: DATASETS (default "synthetic openmoji"), SIZES (default "32 48 64"), KINDS (default
# "text labels"), SYNTHETIC_SAMPLES (default 20000). `make demo` builds only what the five stages read.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/data}
PY=${PYTHON:-.venv/bin/python}
SYNTHETIC_SAMPLES=${SYNTHETIC_SAMPLES:-20000}
DATASETS=${DATASETS:-synthetic openmoji}
SIZES=${SIZES:-32 48 64}
KINDS=${KINDS:-text labels}

tars() {  # dataset size [num-samples]
  local dir="$OUT/$1-$2/tars"
  if [ -n "${3:-}" ] && [ -f "$dir/dataset.json" ] && ! grep -q "\"num_samples\": $3[,}]" "$dir/dataset.json"; then
    echo "$dir holds another number of samples than $3: rebuilding $OUT/$1-$2"
    rm -rf "${OUT:?}/$1-$2"
  fi
  [ -f "$dir/dataset.json" ] || "$PY" -m data.embedded.build --dataset "$1" --out "$dir" --image-size "$2" \
    ${3:+--num-samples "$3"}
}

shards() {  # dataset size kind
  local dir="$OUT/$1-$2"
  "$PY" data/shard_caption_example.py --input-glob "$dir/tars/*.tar" --out-dir "$dir/shards-$3" \
    --captioner tar --vae identity --image-size "$2" --kind "$3" --max-length 32 --quiet
  "$PY" -m data.validate --no-checksum "$dir/shards-$3"
}

for size in $SIZES; do
  for dataset in $DATASETS; do
    if [ "$dataset" = synthetic ]; then tars synthetic "$size" "$SYNTHETIC_SAMPLES"; else tars "$dataset" "$size"; fi
    for kind in $KINDS; do shards "$dataset" "$size" "$kind"; done
  done
done
