#!/usr/bin/env bash
# Everything on a GPU node in one call: build the FFI library, run the GPU tests, the fused-kernel
# microbenchmark, the prefill, serving and paged-attention benchmarks.  Logs, JSON and charts go
# to $OUT (default ./gpu_out).  Stages can be chosen:
#   bash run/gpu_all.sh [build] [test] [fused] [ce] [grid] [prefill] [serve] [attention] [gemm] [tune]
# Not in the default set:
#   ce:   the copy-engine algorithm's local reduce kernel at 16 and 132 blocks, pipelined in 1, 2
#         and 4 chunks, 2K-16K tokens of H 8192 (microbenchmark; needs >= 2 GPUs)
#   grid: the woven copy-engine calls' reduce grid in the model (Llama-3.3-70B shapes, 16 layers,
#         4K and 16K tokens): the tuned grid against 16, 32 and 528 blocks (needs >= 2 GPUs)
# serve runs run/bench_serve.py --quick (TP = all local GPUs); attention checks the paged
# attention kernels against the float32 reference, then times them (one GPU); gemm times the
# decode-sized GEMMs of Llama-3.1-8B: XLA's choices against experimental/skinny_gemm.py (one GPU).
# On one GPU the prefill stage runs one TP=2 rank's shapes (--shard-of 2, dense presets): with
# TP=1 there is no communication to compare.
# All stages together take more than 10 minutes: the fused-kernel test file alone needs > 5 min
# at its default size (set WEAVE_TEST_SHAPES=40 to shrink it).
# Multicast stays off: the NVLS kill switches are exported and WEAVE_ENABLE_MULTIMEM removed.
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset WEAVE_ENABLE_MULTIMEM
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
PRESETS=${PRESETS:-"llama-3.3-70b qwen2.5-72b mixtral-8x22b"}
# the multi-GPU tests run at TP = every local GPU (at most 8) unless WEAVE_TEST_TP says otherwise
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
export WEAVE_TEST_TP=${WEAVE_TEST_TP:-$(( gpus > 8 ? 8 : (gpus < 2 ? 2 : gpus) ))}
stages=${*:-build test fused prefill serve attention gemm}
rc=0
quiet() { grep --line-buffered -vE "^(W|I)0000 "; }   # drop absl/XLA info chatter
for stage in $stages; do
  echo "=== $stage ($(date -u +%H:%M:%S)) ==="
  case $stage in
    fused|ce|grid)
      if [ "$gpus" -lt 2 ]; then
        echo "skipped: $stage measures communication between >= 2 GPUs; $gpus here"
        continue
      fi ;;
  esac
  case $stage in
    build) OUT=$OUT bash run/gpu_fused_check.sh build || rc=1 ;;
    test)
      timeout ${TEST_TIMEOUT:-420} $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/ 2>&1 \
        | quiet | tee "$OUT/gpu_tests.log" || rc=1 ;;
    fused)
      timeout ${FUSED_TIMEOUT:-240} $PY run/bench_allreduce_norm.py --json "$OUT/allreduce_norm.json" \
        2>&1 | quiet | tee "$OUT/allreduce_norm.log" || rc=1 ;;
    ce)
      timeout ${CE_TIMEOUT:-420} $PY run/bench_allreduce_norm.py --skip-torch --min-tokens 2048 \
        --max-tokens 16384 --ctas 16 --plain-ctas= --oneshot-ctas= --ce-grids 16,132 \
        --ce-chunks 1,2,4 --reps 5 --json "$OUT/ce_grids.json" 2>&1 | quiet \
        | tee "$OUT/ce_grids.log" || rc=1 ;;
    grid)
      timeout ${GRID_TIMEOUT:-420} $PY run/bench_prefill.py --layers 16 --tokens 4096 16384 \
        --variants baseline fused+tuned \
        fused+tuned:ce_ctas=32 fused+tuned:ce_ctas=16 fused+tuned:ce_ctas=528 nocomm --iters 6 \
        --no-matmul-peak --json "$OUT/prefill_grid.json" \
        --png "$OUT/prefill_grid.png" 2>&1 | quiet | tee "$OUT/prefill_grid.log" || rc=1 ;;
    prefill)
      for p in $PRESETS; do
        if [ "$gpus" -eq 1 ]; then
          [ "$p" = mixtral-8x22b ] && continue   # --shard-of takes dense presets
          one_gpu="--shard-of 2 --layers 16 --variants nocomm nocomm+weave"
        else
          one_gpu=""
        fi
        timeout ${PREFILL_TIMEOUT:-300} $PY run/bench_prefill.py --preset "$p" $one_gpu \
          ${PREFILL_ARGS:-} --json "$OUT/prefill_$p.json" --png "$OUT/prefill_$p.png" 2>&1 \
          | quiet | tee "$OUT/prefill_$p.log" || rc=1
      done ;;
    tune)
      timeout ${TUNE_TIMEOUT:-240} $PY run/tune_split.py ${TUNE_ARGS:-} 2>&1 | quiet \
        | tee "$OUT/tune.log" || rc=1
      cp weave_jax/tuning/*.json "$OUT/" 2>/dev/null ;;
    serve)
      timeout ${SERVE_TIMEOUT:-360} $PY run/bench_serve.py --quick --json "$OUT/serve.json" \
        --png "$OUT/serve.png" 2>&1 | quiet | tee "$OUT/serve.log" || rc=1 ;;
    attention)
      timeout ${ATTENTION_TIMEOUT:-300} $PY run/check_attention_gpu.py 2>&1 | quiet \
        | tee "$OUT/attention_check.log" || rc=1
      timeout ${ATTENTION_TIMEOUT:-300} $PY run/bench_attention.py --quick \
        --json "$OUT/attention.json" 2>&1 | quiet | tee "$OUT/attention.log" || rc=1 ;;
    gemm)
      timeout ${GEMM_TIMEOUT:-200} $PY run/bench_decode_gemm.py --json "$OUT/decode_gemm.json" 2>&1 \
        | quiet | tee "$OUT/decode_gemm.log" || rc=1 ;;
    *) echo "unknown stage $stage (build test fused ce grid prefill serve attention gemm tune)"
       rc=2 ;;
  esac
done
exit $rc
