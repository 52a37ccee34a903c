// How much a woven copy-engine call's local kernel slows the GEMM it overlaps, by grid, on one
// GPU.  In the woven model (TP=2) each half's call runs on a side stream beside the other
// half's GEMMs; the seventh session's trace put those GEMMs 3.4-6% slower than without
// communication.  The copy engines' NVLink copies are not here (no peer); the SM and HBM
// sharing of the local kernel is.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I ffi ffi/bench/overlap_bench.cu -lcublas -o /tmp/ovl && /tmp/ovl
//
// Per case (Llama-3.3-70B shapes at TP=2: the MLP down projection of one half, M = tokens / 2,
// K = 14336, N = 8192, bf16, fp32 accumulation, and the local kernel over that half's slice,
// H = 8192): the GEMM alone, the kernel alone, then both started together on two streams
// (median of 20): the GEMM's time, the kernel's, and the slow-down of the GEMM.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "bench_util.cuh"

#define CHECK_BLAS(x)                                                          \
  do {                                                                         \
    cublasStatus_t s_ = (x);                                                   \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                         \
      std::fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, \
                   #x, static_cast<int>(s_));                                  \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

int main() {
  constexpr int64_t H = 8192, K = 14336;
  CHECK(cudaFuncSetAttribute(weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, weave::kCeTmaSmemMax));
  cudaStream_t sg, sk;
  CHECK(cudaStreamCreateWithFlags(&sg, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&sk, cudaStreamNonBlocking));
  cublasHandle_t blas;
  CHECK_BLAS(cublasCreate(&blas));
  CHECK_BLAS(cublasSetStream(blas, sg));
  std::printf("GEMM M x %lld x %lld (bf16) beside the local kernel over the same half's slice "
              "(H %lld); µs, median of 20\n", (long long)K, (long long)H, (long long)H);
  std::printf("%6s | %-10s %5s | %9s %9s | %9s %9s | %8s | %9s\n", "tokens", "kernel", "grid",
              "gemm", "kernel", "gemm ovl", "krnl ovl", "gemm +%", "makespan");
  for (int64_t tokens : {4096, 16384}) {
    const int64_t M = tokens / 2, rows = M / 2;  // one half; my slice of it
    __nv_bfloat16 *a, *w, *c;
    CHECK(cudaMalloc(&a, M * K * 2));
    CHECK(cudaMalloc(&w, K * H * 2));
    CHECK(cudaMalloc(&c, M * H * 2));
    fill_random<<<1024, 256>>>(a, M * K, 5);
    fill_random<<<1024, 256>>>(w, K * H, 6);
    const weave::KernelParams p = ce_slice_params(H, rows);
    const float one = 1.f, zero = 0.f;
    auto gemm = [&] {  // C[M, H] = A[M, K] @ W[K, H], row-major (column-major H x M for cuBLAS)
      CHECK_BLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, H, M, K, &one, w, CUDA_R_16BF, H, a,
                              CUDA_R_16BF, K, &zero, c, CUDA_R_16BF, H, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
    };
    struct Case { const char* name; int grid; bool tma; };
    const Case cases[] = {{"load/store", 132, false}, {"load/store", 64, false},
                          {"tma", 132, true}, {"tma", 64, true}, {"tma", 32, true},
                          {"tma", 16, true}};
    const float g_alone = median_us(gemm, sg, 20);
    for (const Case& k : cases) {
      auto kernel = [&] {
        if (k.tma)
          weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>
              <<<k.grid, weave::kCeTmaThreads, weave::ce_tma_smem_bytes(2, H), sk>>>(p);
        else
          weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2><<<k.grid, weave::kThreads, 0, sk>>>(p);
      };
      const float k_alone = median_us(kernel, sk, 20);
      // both together: the kernel stream waits for the GEMM stream's start event
      cudaEvent_t e0, eg, ek;
      CHECK(cudaEventCreate(&e0));
      CHECK(cudaEventCreate(&eg));
      CHECK(cudaEventCreate(&ek));
      std::vector<float> tg, tk, tm;
      for (int i = 0; i < 23; ++i) {
        CHECK(cudaEventRecord(e0, sg));
        CHECK(cudaStreamWaitEvent(sk, e0, 0));
        kernel();
        gemm();
        CHECK(cudaEventRecord(eg, sg));
        CHECK(cudaEventRecord(ek, sk));
        CHECK(cudaStreamSynchronize(sg));
        CHECK(cudaStreamSynchronize(sk));
        float g, kk;
        CHECK(cudaEventElapsedTime(&g, e0, eg));
        CHECK(cudaEventElapsedTime(&kk, e0, ek));
        if (i < 3) continue;  // warm-up
        tg.push_back(g * 1e3f);
        tk.push_back(kk * 1e3f);
        tm.push_back(std::max(g, kk) * 1e3f);
      }
      CHECK(cudaGetLastError());
      for (auto* v : {&tg, &tk, &tm}) std::sort(v->begin(), v->end());
      const float g_ovl = tg[tg.size() / 2], k_ovl = tk[tk.size() / 2], mk = tm[tm.size() / 2];
      std::printf("%6lld | %-10s %5d | %9.1f %9.1f | %9.1f %9.1f | %7.1f%% | %9.1f\n",
                  (long long)tokens, k.name, k.grid, g_alone, k_alone, g_ovl, k_ovl,
                  100.0 * (g_ovl / g_alone - 1.0), mk);
      CHECK(cudaEventDestroy(e0));
      CHECK(cudaEventDestroy(eg));
      CHECK(cudaEventDestroy(ek));
    }
    for (void* x : {(void*)a, (void*)w, (void*)c}) CHECK(cudaFree(x));
    free_ce_slice(p);
  }
  CHECK_BLAS(cublasDestroy(blas));
  return 0;
}
