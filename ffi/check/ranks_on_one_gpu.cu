// The library's kernels with every tensor-parallel rank on ONE GPU: each rank has its own
// buffers (the workspace's layout: in_slot, out_slot, os_slot, pads, epochs, error record) in
// the one device's memory, and the ranks' kernels run at once on their own streams, so the
// paired-block barriers, epochs and staging are exercised exactly as across GPUs (only the
// NVLink hop is missing).  A one-GPU machine can then check the product kernels end to end.
//
//   nvcc -std=c++17 -O3 -arch=native -I ffi ffi/check/ranks_on_one_gpu.cu -o /tmp/ranks && /tmp/ranks
//
// For TP 2 and 4, bf16 and fp16, several (tokens, hidden, grid) cases run in sequence on the
// same buffers (epochs advance, algorithms alternate): the two-shot kernel with TMA copy phases
// (sm_90+) and with 16-byte copies, the one-shot kernel (T <= its staging rows), and the
// copy-engine local kernel between host-driven push and pull copies in two chunks.  Checks:
//   - new_residual equals the host's fp32 sum in rank order rounded to the dtype, bitwise, and
//     equals the residual on padding rows;
//   - normed is within rel-L2 1e-2 (bf16) / 2e-3 (fp16) of the host's fp32 RMSNorm;
//   - normed is bitwise identical on every rank and across the algorithms.
// Grids stay small (ranks x grid <= 64 blocks) so every rank's blocks are resident together;
// a barrier that never completes traps after 5 s and is reported as a failure.
// Prints one line per case and "ALL PASSED" last; exits non-zero on any failure.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fused_reduce_add_norm.cuh"
#include "check/cuda_check.h"  // CHECK (-I ffi)

namespace {

constexpr int64_t kMaxTokens = 4096, kHidden = 16384;  // the workspace's Tmax and H
constexpr float kEps = 1e-6f;

template <typename T> float to_f(T v);
template <> float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> float to_f(__half v) { return __half2float(v); }
template <typename T> T from_f(float v);
template <> __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <> __half from_f(float v) { return __float2half_rn(v); }

uint32_t lcg(uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<uint32_t>(s >> 33);
}
float uniform(uint64_t& s) { return (lcg(s) & 0xffffff) / float(1 << 24) * 2.f - 1.f; }

// One rank's workspace buffers (as workspace.cu allocates them) and its XLA-side tensors.
struct Rank {
  void *in_slot, *out_slot, *os_slot, *partial, *residual, *normed, *new_residual;
  uint32_t *pads, *epochs;
  int32_t* claim;
  weave::ErrorRecord *err_host, *err_dev;
  cudaStream_t stream;
};

struct Group {
  int world;
  int64_t smax, os_rows;
  void* weight;
  std::vector<Rank> ranks;

  explicit Group(int w) : world(w), ranks(w) {
    smax = (kMaxTokens + w - 1) / w;
    const size_t row = kHidden * 2, slot = static_cast<size_t>(w) * smax * row;
    os_rows = std::max<int64_t>(1, std::min<int64_t>(kMaxTokens, weave::kOneShotBytes / row));
    CHECK(cudaMalloc(&weight, row));
    for (Rank& r : ranks) {
      CHECK(cudaMalloc(&r.in_slot, slot));
      CHECK(cudaMalloc(&r.out_slot, slot));
      CHECK(cudaMalloc(&r.os_slot, 2 * (w + 1) * os_rows * row));
      CHECK(cudaMalloc(&r.partial, kMaxTokens * row));
      CHECK(cudaMalloc(&r.residual, smax * row));
      CHECK(cudaMalloc(&r.normed, kMaxTokens * row));
      CHECK(cudaMalloc(&r.new_residual, smax * row));
      CHECK(cudaMalloc(&r.pads, weave::kPadWords * sizeof(uint32_t)));
      CHECK(cudaMemset(r.pads, 0, weave::kPadWords * sizeof(uint32_t)));
      CHECK(cudaMalloc(&r.epochs, weave::kEpochWords * sizeof(uint32_t)));
      CHECK(cudaMemset(r.epochs, 0, weave::kEpochWords * sizeof(uint32_t)));
      CHECK(cudaMalloc(&r.claim, sizeof(int32_t)));
      CHECK(cudaMemset(r.claim, 0, sizeof(int32_t)));
      CHECK(cudaHostAlloc(&r.err_host, sizeof(weave::ErrorRecord), cudaHostAllocMapped));
      std::memset(r.err_host, 0, sizeof(weave::ErrorRecord));
      CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&r.err_dev), r.err_host, 0));
      CHECK(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
    }
  }

  // What handlers.cu's prepare() fills, for rank p of a (T, H) call.
  weave::KernelParams params(int p, int64_t T, int64_t H) const {
    weave::KernelParams k{};
    const Rank& r = ranks[p];
    k.partial = r.partial;
    k.residual = r.residual;
    k.weight = weight;
    k.normed = r.normed;
    k.new_residual = r.new_residual;
    for (int q = 0; q < world; ++q) {
      k.in_slots[q] = ranks[q].in_slot;
      k.out_slots[q] = ranks[q].out_slot;
      k.os_slots[q] = ranks[q].os_slot;
      k.pads[q] = ranks[q].pads;
    }
    k.epochs = r.epochs;
    k.claim = r.claim;
    k.err = r.err_dev;
    k.tokens = T;
    k.hidden = H;
    k.shard = (T + world - 1) / world;
    k.os_rows = os_rows;
    k.threads_per_row = weave::threads_per_row(H);
    k.rank = p;
    k.world = world;
    k.eps = kEps;
    k.timeout_ns = 5ull * 1000 * 1000 * 1000;
    return k;
  }
};

enum Algo { kTwoShotSm90, kTwoShotSm80, kOneShot, kCopyEngine };
const char* kAlgoNames[] = {"two_shot (TMA copies, sm_90 path)",
                            "two_shot (16-byte copies, sm_80 path)", "one_shot",
                            "copy_engine (local kernel)"};

template <typename T, int kVec>
void launch(Algo algo, const weave::KernelParams& k, int grid, cudaStream_t s) {
  switch (algo) {
    case kTwoShotSm90:
      weave::fused_reduce_add_norm_kernel<T, weave::PeerTransport, kVec, true>
          <<<grid, weave::kThreads, weave::kTmaSmemBytes, s>>>(k);
      break;
    case kTwoShotSm80:
      weave::fused_reduce_add_norm_kernel<T, weave::PeerTransport, kVec>
          <<<grid, weave::kThreads, 0, s>>>(k);
      break;
    case kOneShot:
      weave::oneshot_reduce_add_norm_kernel<T, kVec><<<grid, weave::kThreads, 0, s>>>(k);
      break;
    case kCopyEngine:
      weave::ce_reduce_add_norm_kernel<T, kVec><<<grid, weave::kThreads, 0, s>>>(k);
      break;
  }
  CHECK(cudaGetLastError());
}

template <typename T>
void launch_any(Algo algo, const weave::KernelParams& k, int grid, cudaStream_t s) {
  if (weave::vec_per_thread(k.hidden) == 2) launch<T, 2>(algo, k, grid, s);
  else launch<T, 4>(algo, k, grid, s);
}

// The copy-engine algorithm with plain copies in place of the handler's event pipeline: push
// every peer's rows of each chunk, run every rank's local kernel on the chunk, pull.
template <typename T>
void run_copy_engine(const Group& g, int64_t T_, int64_t H, int grid) {
  const int64_t S = (T_ + g.world - 1) / g.world, row = H * 2;
  const int chunks = S >= 2 ? 2 : 1;
  auto rows_of = [&](int q) { return std::max<int64_t>(0, std::min(S, T_ - q * S)); };
  auto at = [&](void* base, int64_t r) { return static_cast<char*>(base) + r * row; };
  for (int c = 0; c < chunks; ++c) {
    const int64_t b = S * c / chunks, e = S * (c + 1) / chunks;
    for (int p = 0; p < g.world; ++p)
      for (int q = 0; q < g.world; ++q) {
        const int64_t n = std::max<int64_t>(0, std::min(e, rows_of(q)) - b);
        if (q != p && n > 0)
          CHECK(cudaMemcpy(at(g.ranks[q].in_slot, p * S + b), at(g.ranks[p].partial, q * S + b),
                           n * row, cudaMemcpyDeviceToDevice));
      }
    CHECK(cudaDeviceSynchronize());  // device-to-device cudaMemcpy may return before it is done
    for (int p = 0; p < g.world; ++p) {
      weave::KernelParams k = g.params(p, T_, H);
      k.row_begin = b;
      k.row_end = e;
      launch_any<T>(kCopyEngine, k, grid, g.ranks[p].stream);
    }
    CHECK(cudaDeviceSynchronize());
  }
  for (int p = 0; p < g.world; ++p)
    for (int q = 0; q < g.world; ++q)
      if (q != p && rows_of(q) > 0)
        CHECK(cudaMemcpy(at(g.ranks[p].normed, q * S), at(g.ranks[q].out_slot, q * S),
                         rows_of(q) * row, cudaMemcpyDeviceToDevice));
}

template <typename T>
std::vector<T> download(const void* src, int64_t n) {
  std::vector<T> v(n);
  CHECK(cudaMemcpy(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// One (T, H, grid) case of one algorithm: fresh inputs from `seed`, every rank's call, checks
// against the host reference.  `first_normed`: rank 0's normed of the first algorithm run on
// these inputs (empty on the first), which every later algorithm must match bitwise.
template <typename T>
bool run_case(Group& g, Algo algo, int64_t T_, int64_t H, int grid, uint64_t seed,
              std::vector<T>& first_normed) {
  const int W = g.world;
  const int64_t S = (T_ + W - 1) / W;
  uint64_t s = seed;
  std::vector<std::vector<T>> partial(W, std::vector<T>(T_ * H));
  std::vector<std::vector<T>> residual(W, std::vector<T>(S * H));
  std::vector<T> weight(H);
  for (auto& v : partial) for (auto& x : v) x = from_f<T>(uniform(s));
  for (auto& v : residual) for (auto& x : v) x = from_f<T>(uniform(s));
  for (auto& x : weight) x = from_f<T>(1.f + 0.25f * uniform(s));
  CHECK(cudaMemcpy(g.weight, weight.data(), H * sizeof(T), cudaMemcpyHostToDevice));
  for (int p = 0; p < W; ++p) {
    CHECK(cudaMemcpy(g.ranks[p].partial, partial[p].data(), T_ * H * sizeof(T),
                     cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(g.ranks[p].residual, residual[p].data(), S * H * sizeof(T),
                     cudaMemcpyHostToDevice));
    CHECK(cudaMemset(g.ranks[p].normed, 0xff, T_ * H * sizeof(T)));
    CHECK(cudaMemset(g.ranks[p].new_residual, 0xff, S * H * sizeof(T)));
  }
  CHECK(cudaDeviceSynchronize());

  if (algo == kCopyEngine) {
    run_copy_engine<T>(g, T_, H, grid);
  } else {
    for (int p = 0; p < W; ++p) launch_any<T>(algo, g.params(p, T_, H), grid, g.ranks[p].stream);
  }
  const cudaError_t done = cudaDeviceSynchronize();
  if (done != cudaSuccess) {
    const weave::ErrorRecord& e = *g.ranks[0].err_host;
    std::printf("FAILED %s: %s (error record: code %d rank %d peer %d barrier %d block %d)\n",
                kAlgoNames[algo], cudaGetErrorString(done), e.code, e.rank, e.peer, e.barrier,
                e.block);
    std::exit(1);  // the context is lost after a trap: nothing else can run
  }

  // host reference: fp32 sum in rank order, + residual, round (= new residual), fp32 RMSNorm
  bool ok = true;
  double err2 = 0, ref2 = 0;
  std::vector<T> ref_res(T_ * H);
  std::vector<float> ref_normed(T_ * H);
  for (int64_t r = 0; r < T_; ++r) {
    const int owner = static_cast<int>(r / S);
    double sumsq = 0;
    for (int64_t c = 0; c < H; ++c) {
      float acc = to_f(partial[0][r * H + c]);
      for (int p = 1; p < W; ++p) acc += to_f(partial[p][r * H + c]);
      acc += to_f(residual[owner][(r - owner * S) * H + c]);
      ref_res[r * H + c] = from_f<T>(acc);
      const float x = to_f(ref_res[r * H + c]);
      sumsq += static_cast<double>(x) * x;
    }
    const double rstd = 1.0 / std::sqrt(sumsq / H + kEps);
    for (int64_t c = 0; c < H; ++c)
      ref_normed[r * H + c] =
          static_cast<float>(to_f(weight[c]) * (to_f(ref_res[r * H + c]) * rstd));
  }
  for (int p = 0; p < W; ++p) {
    const std::vector<T> normed = download<T>(g.ranks[p].normed, T_ * H);
    const std::vector<T> new_res = download<T>(g.ranks[p].new_residual, S * H);
    for (int64_t i = 0; i < S; ++i) {
      const int64_t r = p * S + i;
      for (int64_t c = 0; c < H; ++c) {
        const T want = r < T_ ? ref_res[r * H + c] : residual[p][i * H + c];  // padding row
        if (std::memcmp(&new_res[i * H + c], &want, sizeof(T)) != 0) {
          if (ok) std::printf("  rank %d new_residual row %lld col %lld: %g, want %g\n", p,
                              (long long)i, (long long)c, to_f(new_res[i * H + c]), to_f(want));
          ok = false;
        }
      }
    }
    for (int64_t j = 0; j < T_ * H; ++j) {
      const double d = to_f(normed[j]) - ref_normed[j];
      err2 += d * d;
      ref2 += static_cast<double>(ref_normed[j]) * ref_normed[j];
    }
    if (first_normed.empty()) first_normed = normed;
    if (std::memcmp(normed.data(), first_normed.data(), T_ * H * sizeof(T)) != 0) {
      std::printf("  rank %d normed differs bitwise from rank 0 / the first algorithm\n", p);
      ok = false;
    }
  }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
  const double tol = std::is_same_v<T, __nv_bfloat16> ? 1e-2 : 2e-3;
  if (!(rel < tol)) {
    std::printf("  normed rel-L2 %.3g >= %.0e\n", rel, tol);
    ok = false;
  }
  std::printf("%s world %d %s T %5lld H %5lld grid %3d: rel-L2 %.2e %s\n", ok ? "ok    " : "FAILED",
              W, kAlgoNames[algo], (long long)T_, (long long)H, grid, rel, ok ? "" : "<--");
  return ok;
}

template <typename T>
int run_all(Group& g, bool tma, const char* dtype) {
  struct Case { int64_t tokens, hidden; int grid; };
  const Case cases[] = {{1, 1024, 2}, {3, 8, 2},      {31, 8192, 4},     {33, 16384, 4},
                        {257, 4096, 7}, {1001, 8192, 16}, {4096, 2048, 16}};
  int failures = 0;
  uint64_t seed = 1;
  for (const Case& c : cases) {
    std::vector<T> first;
    for (Algo a : {kTwoShotSm90, kTwoShotSm80, kOneShot, kCopyEngine}) {
      if (a == kTwoShotSm90 && !tma) continue;
      if (a == kOneShot && c.tokens > g.os_rows) continue;  // as the handler refuses it
      failures += !run_case<T>(g, a, c.tokens, c.hidden, c.grid, seed, first);
    }
    ++seed;
  }
  std::printf("world %d %s: %d failing case(s)\n", g.world, dtype, failures);
  return failures;
}

}  // namespace

int main() {
  int dev = 0, major = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const bool tma = major >= 9;  // as the handlers: the TMA copy phases on sm_90+ only
  if (tma) {
    using weave::PeerTransport;
    const void* kernels[] = {
        reinterpret_cast<const void*>(
            weave::fused_reduce_add_norm_kernel<__nv_bfloat16, PeerTransport, 2, true>),
        reinterpret_cast<const void*>(
            weave::fused_reduce_add_norm_kernel<__nv_bfloat16, PeerTransport, 4, true>),
        reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, PeerTransport, 2, true>),
        reinterpret_cast<const void*>(weave::fused_reduce_add_norm_kernel<__half, PeerTransport, 4, true>)};
    for (const void* k : kernels)
      CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 weave::kTmaSmemBytes));
  }
  std::printf("device %d: sm_%d0, %d SMs; TMA copy phases %s\n", dev, major, sms, tma ? "on" : "off");
  int failures = 0;
  for (int world : {2, 4}) {
    if (world * 16 > sms) continue;  // every rank's blocks must be resident together
    Group g(world);
    failures += run_all<__nv_bfloat16>(g, tma, "bf16");
    failures += run_all<__half>(g, tma, "fp16");
  }
  std::printf(failures ? "%d FAILED\n" : "ALL PASSED\n", failures);
  return failures ? 1 : 0;
}
