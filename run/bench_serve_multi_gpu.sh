#!/usr/bin/env bash
# The multi-GPU serving runs: TokenWeave's Figure 12 (1000 prompts of 512 / 1K / 2K tokens + 128
# output tokens, chunk 2048; 4096 for Mixtral) and a chunk sweep (1K, 2K, 4K, 8K at 2K input),
# at TP 2, 4 and 8 on Llama-3.3-70B and Qwen2.5-72B shapes (Mixtral-8x22B at TP >= 4), random
# weights, variants baseline (psum) / fused (fused_p2p unsplit) / fused+weave (the library
# default) / nocomm.  Every Figure-12 run also checks that each variant generates the
# baseline's greedy tokens for 64 prompts; a run where they differ is reported at the end and
# makes the script exit 1 (the other runs still go ahead).
#
# Needs one host with at least 2 GPUs (TP sizes above the GPU count are skipped).  Where the
# weights leave too little memory for the KV cache the layers are cut (--layers: the output
# then reports ratios between variants, not absolute tokens/s):
#   TP 2: 70B/72B at 40 of 80 layers;  TP 4: Mixtral-8x22B at 28 of 56 layers.
#
#   bash run/bench_serve_multi_gpu.sh                 # everything the host's GPU count allows
#   TPS="8" FAMILIES="llama-3.3-70b" bash run/bench_serve_multi_gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results}
TPS=${TPS:-"2 4 8"}
FAMILIES=${FAMILIES:-"llama-3.3-70b qwen2.5-72b mixtral-8x22b"}
VARIANTS="baseline fused fused+weave nocomm"
NGPU=$(nvidia-smi -L | wc -l)
PY=${PY:-python}
mkdir -p "$OUT"
MISMATCH=""

layers_for() {   # preset tp -> "--layers N" where the full model leaves too little for the cache
  case "$1:$2" in
    llama-3.3-70b:2|qwen2.5-72b:2) echo "--layers 40" ;;
    mixtral-8x22b:4) echo "--layers 28" ;;
    *) echo "" ;;
  esac
}

for TP in $TPS; do
  if [ "$TP" -gt "$NGPU" ]; then
    echo "skip TP=$TP: $NGPU GPUs" >&2
    continue
  fi
  for P in $FAMILIES; do
    if [ "$P" = mixtral-8x22b ] && [ "$TP" -lt 4 ]; then
      continue
    fi
    L=$(layers_for "$P" "$TP")
    # Figure 12: each input length its own workload; decode latency at 1/16/64/256 over 2K
    # shellcheck disable=SC2086
    $PY run/bench_serve.py --preset "$P" --tp "$TP" $L --variants $VARIANTS \
      --num-prompts 1000 --input-lens 512 1024 2048 --output-len 128 --greedy-prompts 64 \
      --json "$OUT/serve_fig12_${P}_tp${TP}.json" || MISMATCH="$MISMATCH $P@TP$TP"
    # chunk sweep at 2K input (no decode-latency table: it does not depend on the chunk)
    for C in 1024 2048 4096 8192; do
      # shellcheck disable=SC2086
      $PY run/bench_serve.py --preset "$P" --tp "$TP" $L --variants $VARIANTS \
        --num-prompts 1000 --input-lens 2048 --output-len 128 --chunk "$C" --decode-batches \
        --json "$OUT/serve_chunk${C}_${P}_tp${TP}.json"
    done
  done
done
if [ -n "$MISMATCH" ]; then
  echo "greedy tokens differ from the baseline's (or the run failed) in:$MISMATCH" >&2
  exit 1
fi
