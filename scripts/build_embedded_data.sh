#!/usr/bin/env bash
# Build the embedded datasets (offline) into latent shards: WebDataset tars first, then the same
# sharding pipeline real data goes through, with captions from the tars and the identity VAE.
#   scripts/build_embedded_data.sh [OUT_DIR]   (default outputs/data; about 2.5 minutes on 2 cores)
# Writes OUT/<dataset>-<size>/tars and, per kind, OUT/<dataset>-<size>/shards-text (captions) and
# shards-labels (class labels). Reruns skip what is done (both steps resume).
# Environment: DATASETS (default "synthetic openmoji"), SIZES (default "32 48 64"), KINDS (default
# "text labels"), SYNTHETIC_SAMPLES (default 20000). `make demo` builds only what the five stages read.
# Synthetic text at 40 or 48 px also gets OUT/synthetic-<size>-buckets/shards-text, what the embedded Stages 4-5
# read: the same scenes rendered at the aspect-ratio buckets of that size in turn (BUCKETS_40, BUCKETS_48: the
# rule of data/buckets.py in steps of 8 px, aspect within 1.5), one shard series per bucket, with the MiniLM's
# states of every caption stored (--text-features). BUCKETED=0 skips them; BUCKETED=only builds them instead of
# the square synthetic sets at 40 and 48 px (all `make demo` reads at those sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/data}
PY=${PYTHON:-.venv/bin/python}
SYNTHETIC_SAMPLES=${SYNTHETIC_SAMPLES:-20000}
DATASETS=${DATASETS:-synthetic openmoji}
SIZES=${SIZES:-32 48 64}
KINDS=${KINDS:-text labels}
BUCKETED=${BUCKETED:-1}
BUCKETS_40=${BUCKETS_40:-40x40,32x48,48x32}
BUCKETS_48=${BUCKETS_48:-48x48,40x56,56x40}

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

bucketed() {  # size buckets num-samples: synthetic scenes at the buckets' sizes, sharded per bucket with features
  local dir="$OUT/synthetic-$1-buckets"
  if [ -f "$dir/tars/dataset.json" ] && ! grep -q "\"num_samples\": $3[,}]" "$dir/tars/dataset.json"; then
    echo "$dir holds another number of samples than $3: rebuilding it"
    rm -rf "${dir:?}"
  fi
  [ -f "$dir/tars/dataset.json" ] || "$PY" -m data.embedded.build --dataset synthetic --out "$dir/tars" \
    --image-size "$1" --num-samples "$3" --sizes "$2"
  "$PY" data/shard_caption_example.py --input-glob "$dir/tars/*.tar" --out-dir "$dir/shards-text" \
    --captioner tar --vae identity --image-size "$1" --buckets "$2" --text-features --max-length 32 --quiet
  "$PY" -m data.validate --no-checksum "$dir/shards-text"
}

for size in $SIZES; do
  for dataset in $DATASETS; do
    buckets=""
    if [ "$dataset" = synthetic ] && [ "$BUCKETED" != 0 ] && [[ " $KINDS " == *" text "* ]]; then
      case "$size" in 40) buckets=$BUCKETS_40 ;; 48) buckets=$BUCKETS_48 ;; esac
    fi
    if [ -z "$buckets" ] || [ "$BUCKETED" != only ]; then
      if [ "$dataset" = synthetic ]; then tars synthetic "$size" "$SYNTHETIC_SAMPLES"; else tars "$dataset" "$size"; fi
      for kind in $KINDS; do shards "$dataset" "$size" "$kind"; done
    fi
    if [ -n "$buckets" ]; then bucketed "$size" "$buckets" "$SYNTHETIC_SAMPLES"; fi
  done
done
