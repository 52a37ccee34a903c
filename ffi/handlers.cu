// XLA FFI handlers of the fused AllReduce + residual + RMSNorm kernel.
//
//   weave_fused_ran         one call: normed, new_residual            (kernel on XLA's stream)
//
// Every handler takes `algo`: 0 two-shot kernel (peer transport: bulk TMA copies on sm_90+,
// 16-byte copies on sm_80), 1 copy-engine (push copies, reduce kernel, pull copies, ranks
// meeting on the host; peer transport, one process driving every GPU), 2 one-shot kernel
// (T <= the workspace's one-shot rows; peer transport only).  Any other code is refused with an
// error naming the op and the code.  Each algorithm's protocol opens its kernel file
// (fused_reduce_add_norm.cuh lists them).
//   weave_fused_ran_graph   the same handler, marked command-buffer compatible
//   weave_fused_start       kernel on the library's side stream (normal priority), writing
//                           straight into start's own outputs normed / new_residual, which XLA
//                           sees as ready before they are; returns them with a 1-element token
//   weave_fused_done        takes the token, start's outputs (aliased to its own outputs: no
//                           copy) AND start's inputs (so XLA keeps them alive), and makes XLA's
//                           stream wait for the side stream.  Between start and done nothing but
//                           done may read start's outputs (weave_jax.fused.ops keeps it so).
//
// Handlers look the workspace up by device ordinal and return ffi::Error (every message starts
// with the op's name); Python validates the same things before launch with friendlier errors.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <utility>

#include "fused_reduce_add_norm.cuh"
#include "workspace.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTransportPeer = 0;
constexpr int kTransportMultimem = 1;
constexpr int kAlgoTwoShot = 0;
constexpr int kAlgoCopyEngine = 1;
constexpr int kAlgoOneShot = 2;

ffi::Error op_error(const char* op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(op) + ": " + msg);
}

ffi::Error cuda_error(const char* op, const char* what, cudaError_t e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string(op) + ": " + what + ": " + cudaGetErrorString(e));
}

bool is_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}

// Validates shapes against the workspace and fills the kernel parameters.
ffi::Error prepare(const char* op, int ordinal, ffi::AnyBuffer partial, ffi::AnyBuffer residual,
                   ffi::AnyBuffer weight, float eps, int32_t ctas, int32_t slot, int32_t transport,
                   int32_t algo, weave::KernelParams* p, weave::DeviceWorkspace** ws_out) {
  if (ordinal < 0 || ordinal >= weave::kMaxDevices || !weave::workspace(ordinal).ready)
    return op_error(op, "workspace not initialised on device " + std::to_string(ordinal));
  weave::DeviceWorkspace& w = weave::workspace(ordinal);
  const auto dt = partial.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)
    return op_error(op, "dtype must be bf16 or f16");
  if (residual.element_type() != dt || weight.element_type() != dt)
    return op_error(op, "partial, residual and weight must share one dtype");
  auto pd = partial.dimensions();
  auto rd = residual.dimensions();
  if (pd.size() != 2 || rd.size() != 2 || weight.dimensions().size() != 1)
    return op_error(op, "expected partial (T, H), residual (S, H), weight (H,)");
  const int64_t T = pd[0], H = pd[1];
  const int64_t S = (T + w.world - 1) / w.world;
  if (H % 8 != 0 || H > w.hidden || H > weave::kMaxHidden)
    return op_error(op, "hidden " + std::to_string(H) + " must be a multiple of 8 and <= " +
                            std::to_string(w.hidden));
  if (T < 1 || T > w.max_tokens)
    return op_error(op, "tokens " + std::to_string(T) + " outside 1.." + std::to_string(w.max_tokens));
  if (rd[0] != S || rd[1] != H || weight.dimensions()[0] != H)
    return op_error(op, "residual must be (" + std::to_string(S) + ", " + std::to_string(H) + ")");
  if (algo < kAlgoTwoShot || algo > kAlgoOneShot)
    return op_error(op, "algo " + std::to_string(algo) + " is not 0 (two-shot), 1 (copy engine) "
                        "or 2 (one-shot)");
  const int max_ctas = algo == kAlgoCopyEngine ? weave::kMaxCeCtas : weave::kMaxCtas;
  if (ctas < weave::kMinCtas || ctas > max_ctas)
    return op_error(op, "ctas " + std::to_string(ctas) + " outside 2.." + std::to_string(max_ctas));
  if (slot < 0 || slot >= w.num_slots) return op_error(op, "slot out of range");
  if (transport == kTransportMultimem && w.mc_in == nullptr)
    return op_error(op, "multimem transport requested but the workspace has no multicast buffers");
  if (transport == kTransportMultimem && algo != kAlgoTwoShot)
    return op_error(op, "the multimem transport runs the two-shot algorithm only");
  if (algo == kAlgoOneShot && T > w.os_rows)
    return op_error(op, "one-shot needs tokens <= " + std::to_string(w.os_rows) + ", got " +
                            std::to_string(T));
  *p = weave::KernelParams{};
  p->partial = partial.untyped_data();
  p->residual = residual.untyped_data();
  p->weight = weight.untyped_data();
  for (int q = 0; q < w.world; ++q) {
    p->in_slots[q] = w.peer_in[q];
    p->out_slots[q] = w.peer_out[slot][q];
    p->pads[q] = w.peer_pads[q];
    p->os_slots[q] = w.peer_os[q];
  }
  p->in_mc = w.mc_in;
  p->out_mc = w.mc_out[slot];
  p->epochs = w.epochs;
  p->claim = w.claim;
  p->err = w.err_dev;
  p->tokens = T;
  p->hidden = H;
  p->shard = S;
  p->os_rows = w.os_rows;
  p->threads_per_row = weave::threads_per_row(H);
  p->rank = w.rank;
  p->world = w.world;
  p->eps = eps;
  p->timeout_ns = w.timeout_ns;
  p->stamps = w.stamps_on ? w.stamps_dev : nullptr;
  *ws_out = &w;
  return ffi::Error::Success();
}

// One copy of `bytes` from rank `src_rank`'s to rank `dst_rank`'s memory on stream s (both
// devices of this process): cudaMemcpyPeerAsync, asynchronous with respect to all work on
// other devices.
cudaError_t copy_between(const weave::DeviceWorkspace& w, void* dst, int dst_rank,
                         const void* src, int src_rank, size_t bytes, cudaStream_t s) {
  return cudaMemcpyPeerAsync(dst, w.peer_ordinal[dst_rank], src, w.peer_ordinal[src_rank], bytes,
                             s);
}

// Host rendezvous `point` (0 "pushed", 1 "reduced") of copy-engine call n: publish my arrival,
// then wait for every rank's, up to the workspace's timeout.  On timeout the error record gets
// {rank, peer, barrier kBarCePushed + point, block -1, call n}, the rendezvous is marked broken
// (ranks would otherwise disagree on call numbers) and an error naming both ranks is returned.
ffi::Error host_rendezvous(const char* op, weave::DeviceWorkspace& w, int point, uint64_t n) {
  weave::HostRendezvous& g = *w.rendezvous;
  const char* name = point == 0 ? "pushed" : "reduced";
  g.arrived[point][w.rank].store(n, std::memory_order_release);
  const auto t0 = std::chrono::steady_clock::now();
  for (int q = 0; q < w.world; ++q) {
    for (uint32_t spins = 1; g.arrived[point][q].load(std::memory_order_acquire) < n; ++spins) {
      if (g.broken.load(std::memory_order_relaxed))
        return ffi::Error(ffi::ErrorCode::kAborted,
                          std::string(op) + ": copy-engine rendezvous broken by an earlier timeout;"
                          " re-initialise the workspace");
      if (spins < 4096) continue;  // peers usually arrive within microseconds
      std::this_thread::yield();
      const auto waited = std::chrono::steady_clock::now() - t0;
      if (std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count() >
          static_cast<int64_t>(w.timeout_ns)) {
        g.broken.store(true);
        volatile weave::ErrorRecord* e = w.err_host;
        e->rank = w.rank;
        e->peer = q;
        e->barrier = weave::kBarCePushed + point;
        e->block = -1;
        e->epoch = static_cast<uint32_t>(n);
        std::atomic_thread_fence(std::memory_order_release);
        e->code = 1;
        return ffi::Error(ffi::ErrorCode::kDeadlineExceeded,
                          std::string(op) + ": rank " + std::to_string(w.rank) +
                              " timed out at copy-engine rendezvous '" + name +
                              "' waiting for rank " + std::to_string(q) + " (call " +
                              std::to_string(n) + ")");
      }
    }
  }
  return ffi::Error::Success();
}

template <typename T, int kVec>
cudaError_t launch_typed(const weave::KernelParams& p, const weave::DeviceWorkspace& w,
                         int32_t transport, int32_t algo, int32_t ctas, cudaStream_t s) {
  switch (algo) {
    case kAlgoCopyEngine:  // its local kernel only: run_copy_engine enqueues the copies around it
      weave::ce_reduce_add_norm_kernel<T, kVec><<<ctas, weave::kThreads, 0, s>>>(p);
      break;
    case kAlgoOneShot:
      weave::oneshot_reduce_add_norm_kernel<T, kVec><<<ctas, weave::kThreads, 0, s>>>(p);
      break;
    default:  // two-shot: bulk (TMA) copies on sm_90+, 16-byte copies on sm_80
      if (transport == kTransportMultimem)
        weave::fused_reduce_add_norm_kernel<T, weave::MultimemTransport, kVec>
            <<<ctas, weave::kThreads, 0, s>>>(p);
      else if (w.sm_major >= 9)
        weave::fused_reduce_add_norm_kernel<T, weave::PeerTransport, kVec, true>
            <<<ctas, weave::kThreads, weave::kTmaSmemBytes, s>>>(p);
      else
        weave::fused_reduce_add_norm_kernel<T, weave::PeerTransport, kVec>
            <<<ctas, weave::kThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch(const weave::KernelParams& p, const weave::DeviceWorkspace& w, bool bf16,
                   int32_t transport, int32_t algo, int32_t ctas, cudaStream_t s) {
  const bool v2 = weave::vec_per_thread(p.hidden) == 2;
  if (bf16)
    return v2 ? launch_typed<__nv_bfloat16, 2>(p, w, transport, algo, ctas, s)
              : launch_typed<__nv_bfloat16, 4>(p, w, transport, algo, ctas, s);
  return v2 ? launch_typed<__half, 2>(p, w, transport, algo, ctas, s)
            : launch_typed<__half, 4>(p, w, transport, algo, ctas, s);
}

// Copy-engine algorithm (protocol in the kernel file): per chunk, push copies on the push
// stream, the local reduce kernel on s, pull copies on the pull stream, ordered by events; the
// ranks' handler threads meet twice on the host per call.
ffi::Error run_copy_engine(const char* op, const weave::KernelParams& p, weave::DeviceWorkspace& w,
                           bool bf16, int32_t ctas, int32_t chunks, cudaStream_t s) {
  if (w.ipc || w.rendezvous == nullptr)
    return op_error(op, "algorithm copy_engine needs one process driving every GPU of the group");
  if (is_capturing(s))
    return op_error(op, "algorithm copy_engine cannot run under CUDA graph capture");
  const uint64_t n = ++w.ce_calls;
  const int64_t rb = p.hidden * w.dtype_bytes;
  // chunk c = slice rows [S*c/C, S*(c+1)/C): the same cut on every rank (S and C are equal)
  const int C = static_cast<int>(std::min<int64_t>(chunks, p.shard));
  auto chunk_begin = [&](int c) { return p.shard * c / C; };
  // rows of chunk [b, e) that owner q's slice really has (the last slice may be short)
  auto rows_in = [&](int q, int64_t b, int64_t e) {
    return std::max<int64_t>(0, std::min(e, weave::rows_of_owner(p, q)) - b);
  };
  auto row_ptr = [&](const void* base, int64_t row) {
    return const_cast<char*>(static_cast<const char*>(base)) + row * rb;
  };
  cudaEventRecord(w.ev_ce_begin, s);
  cudaStreamWaitEvent(w.ce_push, w.ev_ce_begin, 0);
  for (int c = 0; c < C; ++c) {  // my partial rows of chunk c of q's slice -> q's in_slot
    const int64_t b = chunk_begin(c), e = chunk_begin(c + 1);
    for (int k = 1; k < p.world; ++k) {
      const int q = (p.rank + k) % p.world;
      if (const int64_t rows = rows_in(q, b, e); rows > 0)
        if (cudaError_t err = copy_between(w, row_ptr(p.in_slots[q], p.rank * p.shard + b), q,
                                           row_ptr(p.partial, q * p.shard + b), p.rank,
                                           rows * rb, w.ce_push);
            err != cudaSuccess)
          return cuda_error(op, "push copy", err);
    }
    cudaEventRecord(w.ev_pushed[c], w.ce_push);
  }
  if (auto err = host_rendezvous(op, w, 0, n); err.failure()) return err;
  for (int c = 0; c < C; ++c) {  // chunk c of my slice, once every peer pushed it
    for (int q = 0; q < p.world; ++q)
      if (q != p.rank) cudaStreamWaitEvent(s, weave::workspace(w.peer_ordinal[q]).ev_pushed[c], 0);
    weave::KernelParams kp = p;
    kp.row_begin = chunk_begin(c);
    kp.row_end = chunk_begin(c + 1);
    if (cudaError_t e = launch(kp, w, bf16, kTransportPeer, kAlgoCopyEngine, ctas, s);
        e != cudaSuccess)
      return cuda_error(op, "kernel launch", e);
    cudaEventRecord(w.ev_reduced[c], s);
  }
  if (auto err = host_rendezvous(op, w, 1, n); err.failure()) return err;
  for (int c = 0; c < C; ++c) {  // q's normalized rows of chunk c (its out_slot) -> my normed
    const int64_t b = chunk_begin(c), e = chunk_begin(c + 1);
    for (int q = 0; q < p.world; ++q)
      if (q != p.rank)
        cudaStreamWaitEvent(w.ce_pull, weave::workspace(w.peer_ordinal[q]).ev_reduced[c], 0);
    for (int k = 1; k < p.world; ++k) {
      const int q = (p.rank + k) % p.world;
      if (const int64_t rows = rows_in(q, b, e); rows > 0)
        if (cudaError_t err = copy_between(w, row_ptr(p.normed, q * p.shard + b), p.rank,
                                           row_ptr(p.out_slots[q], q * p.shard + b), q,
                                           rows * rb, w.ce_pull);
            err != cudaSuccess)
          return cuda_error(op, "pull copy", err);
    }
  }
  cudaEventRecord(w.ev_pulled, w.ce_pull);
  cudaStreamWaitEvent(s, w.ev_pulled, 0);
  cudaStreamWaitEvent(s, w.ev_pushed[C - 1], 0);  // my pushes read `partial`
  return ffi::Error::Success();
}

ffi::Error check_chunks(const char* op, int32_t ce_chunks) {
  if (ce_chunks < 1 || ce_chunks > weave::kMaxCeChunks)
    return op_error(op, "ce_chunks " + std::to_string(ce_chunks) + " outside 1.." +
                            std::to_string(weave::kMaxCeChunks));
  return ffi::Error::Success();
}

// Enqueues one call of `algo` on stream s: the copy-engine sequence, or one kernel.
ffi::Error enqueue(const char* op, const weave::KernelParams& p, weave::DeviceWorkspace& w,
                   bool bf16, int32_t transport, int32_t algo, int32_t ctas, int32_t ce_chunks,
                   cudaStream_t s) {
  if (algo == kAlgoCopyEngine) return run_copy_engine(op, p, w, bf16, ctas, ce_chunks, s);
  if (cudaError_t e = launch(p, w, bf16, transport, algo, ctas, s); e != cudaSuccess)
    return cuda_error(op, "kernel launch", e);
  return ffi::Error::Success();
}

}  // namespace

// Loads every kernel of the library on the current device.  With CUDA's lazy loading a kernel
// is otherwise loaded at its first launch, and loading may wait for the device's running work;
// a peer's kernel spinning at a barrier for this launch would then wait until its timeout.
cudaError_t weave::preload_kernels(int sm_major) {
  const void* kernels[] = {
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::PeerTransport, 2>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::PeerTransport, 4>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::PeerTransport, 2>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::PeerTransport, 4>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::MultimemTransport, 2>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::MultimemTransport, 4>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::MultimemTransport, 2>),
      reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::MultimemTransport, 4>),
      reinterpret_cast<const void*>(weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2>),
      reinterpret_cast<const void*>(weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 4>),
      reinterpret_cast<const void*>(weave::ce_reduce_add_norm_kernel<__half, 2>),
      reinterpret_cast<const void*>(weave::ce_reduce_add_norm_kernel<__half, 4>),
      reinterpret_cast<const void*>(weave::oneshot_reduce_add_norm_kernel<__nv_bfloat16, 2>),
      reinterpret_cast<const void*>(weave::oneshot_reduce_add_norm_kernel<__nv_bfloat16, 4>),
      reinterpret_cast<const void*>(weave::oneshot_reduce_add_norm_kernel<__half, 2>),
      reinterpret_cast<const void*>(weave::oneshot_reduce_add_norm_kernel<__half, 4>),
  };
  for (const void* k : kernels) {
    cudaFuncAttributes attr;
    if (cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  // The two-shot TMA kernels: only sm_90+ launches them (with > 48 KiB of dynamic shared memory, which
  // is also more than some older GPUs allow: there they are only loaded).
  const std::pair<const void*, int> tma[] = {
      {reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::PeerTransport, 2, true>), weave::kTmaSmemBytes},
      {reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::PeerTransport, 4, true>), weave::kTmaSmemBytes},
      {reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::PeerTransport, 2, true>), weave::kTmaSmemBytes},
      {reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, weave::PeerTransport, 4, true>), weave::kTmaSmemBytes},
  };
  for (const auto& [k, smem] : tma) {
    cudaFuncAttributes attr;
    cudaError_t e = sm_major >= 9 ? cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)
                                  : cudaFuncGetAttributes(&attr, k);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

namespace {

ffi::Error RanImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial,
                   ffi::AnyBuffer residual, ffi::AnyBuffer weight,
                   ffi::Result<ffi::AnyBuffer> normed, ffi::Result<ffi::AnyBuffer> new_residual,
                   float eps, int32_t ctas, int32_t transport, int32_t algo, int32_t ce_chunks) {
  constexpr const char* op = "weave_fused_ran";
  if (auto err = check_chunks(op, ce_chunks); err.failure()) return err;
  weave::KernelParams p;
  weave::DeviceWorkspace* w;
  if (auto err = prepare(op, ordinal, partial, residual, weight, eps, ctas, 0, transport, algo, &p, &w);
      err.failure())
    return err;
  p.normed = normed->untyped_data();
  p.new_residual = new_residual->untyped_data();
  const bool capturing = is_capturing(stream);
  ++w->handler_calls;
  if (capturing) ++w->captured_calls;
  // Serialize with a start on the side stream that no later wait covered: both kernels use
  // in_slot and the signal pads.  A call recorded into a CUDA graph cannot wait for it (the
  // wait would not be replayed with the graph): recording is fine once a done has made XLA's
  // stream wait for the latest start, and an error (not a race) before.  Fused calls on two XLA
  // streams (compute_on) must be ordered by data dependencies.
  if (w->side_pending && !capturing) {
    cudaStreamWaitEvent(stream, w->ev_last, 0);
    w->side_pending = false;
  } else if (w->side_pending && w->done_upto < w->starts) {
    return op_error(op, "called under CUDA graph capture (cmd_buffer=True) while a woven call "
                        "(fused_start) is pending: put its fused_done first, or use "
                        "cmd_buffer=False");
  }
  return enqueue(op, p, *w, partial.element_type() == ffi::DataType::BF16, transport, algo, ctas,
                 ce_chunks, stream);
}

ffi::Error StartImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial,
                     ffi::AnyBuffer residual, ffi::AnyBuffer weight,
                     ffi::Result<ffi::AnyBuffer> token, ffi::Result<ffi::AnyBuffer> normed,
                     ffi::Result<ffi::AnyBuffer> new_residual, float eps, int32_t ctas,
                     int32_t slot, int32_t transport, int32_t algo, int32_t ce_chunks) {
  constexpr const char* op = "weave_fused_start";
  if (auto err = check_chunks(op, ce_chunks); err.failure()) return err;
  weave::KernelParams p;
  weave::DeviceWorkspace* w;
  if (auto err = prepare(op, ordinal, partial, residual, weight, eps, ctas, slot, transport, algo, &p, &w);
      err.failure())
    return err;
  // Straight into start's outputs: done only waits (no copy out of the workspace).
  p.normed = normed->untyped_data();
  p.new_residual = new_residual->untyped_data();
  if (is_capturing(stream)) return op_error(op, "not supported under CUDA graph capture");
  cudaStream_t side = w->side;  // starts follow each other in its stream order
  // inputs and every earlier kernel on XLA's stream (sync calls included) before the side stream
  cudaEventRecord(w->ev_inputs, stream);
  cudaStreamWaitEvent(side, w->ev_inputs, 0);
  if (auto err = enqueue(op, p, *w, partial.element_type() == ffi::DataType::BF16, transport, algo,
                         ctas, ce_chunks, side);
      err.failure())
    return err;
  cudaEventRecord(w->ev_done[slot], side);
  cudaEventRecord(w->ev_last, side);
  w->side_pending = true;
  w->slot_start[slot] = ++w->starts;
  if (cudaError_t e = cudaMemsetAsync(token->untyped_data(), 0, token->size_bytes(), stream);
      e != cudaSuccess)
    return cuda_error(op, "token", e);
  return ffi::Error::Success();
}

ffi::Error DoneImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer token,
                    ffi::AnyBuffer start_normed, ffi::AnyBuffer start_residual,
                    ffi::AnyBuffer partial, ffi::AnyBuffer residual, ffi::AnyBuffer weight,
                    ffi::Result<ffi::AnyBuffer> normed, ffi::Result<ffi::AnyBuffer> new_residual,
                    int32_t slot) {
  constexpr const char* op = "weave_fused_done";
  (void)token;
  (void)partial;
  (void)residual;
  (void)weight;
  if (ordinal < 0 || ordinal >= weave::kMaxDevices || !weave::workspace(ordinal).ready)
    return op_error(op, "workspace not initialised on device " + std::to_string(ordinal));
  weave::DeviceWorkspace& w = weave::workspace(ordinal);
  if (slot < 0 || slot >= w.num_slots) return op_error(op, "slot out of range");
  if (cudaError_t e = cudaStreamWaitEvent(stream, w.ev_done[slot], 0); e != cudaSuccess)
    return cuda_error(op, "wait", e);
  // Waiting for a start covers every earlier one (starts run in the side stream's order); a
  // synchronous call recorded into a graph relies on it (RanImpl).
  if (w.slot_start[slot] > w.done_upto) w.done_upto = w.slot_start[slot];
  // The outputs alias start's outputs (input_output_aliases); copy only if XLA did not alias
  // them, after the wait, so the copy reads finished results.
  const std::pair<ffi::AnyBuffer*, ffi::Result<ffi::AnyBuffer>*> pairs[] = {
      {&start_normed, &normed}, {&start_residual, &new_residual}};
  for (auto [in, out] : pairs) {
    if ((*out)->untyped_data() == in->untyped_data()) continue;
    if (cudaError_t e = cudaMemcpyAsync((*out)->untyped_data(), in->untyped_data(),
                                        in->size_bytes(), cudaMemcpyDeviceToDevice, stream);
        e != cudaSuccess)
      return cuda_error(op, "copy", e);
  }
  return ffi::Error::Success();
}

}  // namespace

// clang-format off
#define WEAVE_RAN_BINDING                                                                     \
  ffi::Ffi::Bind()                                                                            \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()  /* XLA's compute stream */                  \
      .Ctx<ffi::DeviceOrdinal>()                 /* selects the workspace */                  \
      .Arg<ffi::AnyBuffer>()                     /* partial (T, H) */                         \
      .Arg<ffi::AnyBuffer>()                     /* residual (S, H), S = ceil(T / world) */   \
      .Arg<ffi::AnyBuffer>()                     /* weight (H,) */                            \
      .Ret<ffi::AnyBuffer>()                     /* normed (T, H), replicated */              \
      .Ret<ffi::AnyBuffer>()                     /* new residual (S, H) */                    \
      .Attr<float>("eps")                        /* RMSNorm epsilon */                        \
      .Attr<int32_t>("ctas")                     /* grid size, same on every rank */          \
      .Attr<int32_t>("transport")                /* 0 peer, 1 multimem */                     \
      .Attr<int32_t>("algo")                     /* 0 two-shot, 1 copy engine, 2 one-shot */ \
      .Attr<int32_t>("ce_chunks")                /* copy engine: pipeline chunks, 1..32 */

XLA_FFI_DEFINE_HANDLER_SYMBOL(weave_fused_ran, RanImpl, WEAVE_RAN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(weave_fused_ran_graph, RanImpl, WEAVE_RAN_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(weave_fused_start, StartImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()   // partial (T, H)
                                  .Arg<ffi::AnyBuffer>()   // residual (S, H)
                                  .Arg<ffi::AnyBuffer>()   // weight (H,)
                                  .Ret<ffi::AnyBuffer>()   // token u32[1]
                                  .Ret<ffi::AnyBuffer>()   // normed (T, H), written later
                                  .Ret<ffi::AnyBuffer>()   // new residual (S, H), written later
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("ctas")
                                  .Attr<int32_t>("slot")   // workspace slot (peers' staging)
                                  .Attr<int32_t>("transport")
                                  .Attr<int32_t>("algo")   // 0 two-shot, 1 copy engine, 2 one-shot
                                  .Attr<int32_t>("ce_chunks")); // copy engine: chunks, 1..32

XLA_FFI_DEFINE_HANDLER_SYMBOL(weave_fused_done, DoneImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()   // token from start
                                  .Arg<ffi::AnyBuffer>()   // start's normed (aliased to out 0)
                                  .Arg<ffi::AnyBuffer>()   // start's new residual (to out 1)
                                  .Arg<ffi::AnyBuffer>()   // start's partial (kept alive)
                                  .Arg<ffi::AnyBuffer>()   // start's residual (kept alive)
                                  .Arg<ffi::AnyBuffer>()   // start's weight (kept alive)
                                  .Ret<ffi::AnyBuffer>()   // normed (T, H)
                                  .Ret<ffi::AnyBuffer>()   // new residual (S, H)
                                  .Attr<int32_t>("slot"));
// clang-format on
