#!/usr/bin/env bash
# The main job, fitted to the machine (arguments go to run/bench_prefill.py):
#   several GPUs: the prefill benchmark over all of them (Llama-3.3-70B shapes, 1K-16K tokens:
#                 the psum baseline, the woven and unsplit fused model, nocomm);
#   one GPU:      what one GPU can show: the split's compute cost at one TP=2 rank's shapes
#                 (nocomm against nocomm+weave), then the paged-attention and serving
#                 benchmarks; it says what needs more GPUs;
#   no GPU:       the tiny preset on 8 virtual CPU devices (shows that the harness works).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" bench
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ne 1 ]; then
  exec "$WEAVE_PY" run/bench_prefill.py "$@"
fi
echo "[bench] one GPU: tensor parallelism needs >= 2 GPUs, so the woven model against the psum" \
     "baseline, the fused AllReduce + RMSNorm kernel and TP decode need more GPUs (there:" \
     "bash run/bench.sh, or bash run/gpu_all.sh). Here: the split's compute cost at one TP=2" \
     "rank's shapes, and the single-GPU benchmarks." >&2
rc=0
"$WEAVE_PY" run/bench_prefill.py --shard-of 2 --layers 16 --variants nocomm nocomm+weave "$@" || rc=1
for extra in run/bench_attention.py run/bench_serve.py; do
  echo "[bench] $extra" >&2
  "$WEAVE_PY" "$extra" || rc=1
done
exit $rc
