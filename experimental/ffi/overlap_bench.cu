// What a woven copy-engine call's local kernel costs the compute it overlaps, by grid, on one
// GPU.  In the woven model (TP=2) each half's call runs on a side stream while the other half's
// GEMMs run; a trace of the woven model (2 x H200, 2026-11-30) put those GEMMs 3.4-6% slower
// than without communication.  The copy engines' NVLink copies are not here (no peer); the SM and HBM
// sharing of the local kernel is, and a local device-to-device copy of the slice stands in for
// the copy engines' HBM traffic.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I ffi experimental/ffi/overlap_bench.cu -lcublas -o /tmp/ovl && /tmp/ovl
//   ncu --metrics launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__grid_size /tmp/ovl gemm
//
// Why a chain and a delay: cuBLAS's H200 GEMM for these shapes is persistent, one 384-thread
// block per SM that takes the whole register file (ncu, 2026-12-01: nvjet_sm90_tst_320x128,
// 168 registers a thread, 189 KiB of shared memory, grid 132), so no other block can share an
// SM with it.  A kernel started beside it runs only where GEMM blocks have exited (the last,
// partial wave) and then holds those SMs against the next GEMM.  So the kernel is launched
// 100 µs into the first of three GEMMs (one half's down projection, M = tokens / 2, K = 14336,
// N = 8192, bf16) as in the woven schedule, and the cost is the chain's makespan with the
// kernel minus the chain alone timed the same way ("none"), per round of all cases run in
// turn; median and quartiles over 30 rounds.  "hidden" = kernel alone - cost.
// `ovl gemm` runs each size's GEMM once, for ncu.  `ovl TOKENS DELAYS` (comma lists, e.g.
// `ovl 4096,8192 30,100,300`) sets the token counts and the kernel's delays in µs (default
// 4096,16384 and 100).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
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

void host_wait_us(int us) {
  const auto t = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t < std::chrono::microseconds(us)) {
  }
}

std::vector<int64_t> int_list(const char* arg) {  // "a,b,c" -> {a, b, c}
  std::vector<int64_t> v;
  for (const char* c = arg; *c;) {
    char* end;
    v.push_back(std::strtoll(c, &end, 10));
    c = *end == ',' ? end + 1 : end;
    if (end == c && *c) {
      std::fprintf(stderr, "not a comma list of integers: %s\n", arg);
      std::exit(2);
    }
  }
  return v;
}

int main(int argc, char** argv) {
  const bool gemm_only = argc > 1 && std::string(argv[1]) == "gemm";
  const std::vector<int64_t> token_counts =
      argc > 1 && !gemm_only ? int_list(argv[1]) : std::vector<int64_t>{4096, 16384};
  const std::vector<int64_t> delays = argc > 2 ? int_list(argv[2]) : std::vector<int64_t>{100};
  constexpr int64_t H = 8192, K = 14336;
  constexpr int kChain = 3, kReps = 30;
  CHECK(cudaFuncSetAttribute(weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, weave::kCeTmaSmemMax));
  cudaStream_t sg, sk;
  CHECK(cudaStreamCreateWithFlags(&sg, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&sk, cudaStreamNonBlocking));
  cublasHandle_t blas;
  CHECK_BLAS(cublasCreate(&blas));
  CHECK_BLAS(cublasSetStream(blas, sg));
  if (!gemm_only)
    std::printf("%d GEMMs M x %lld x %lld (bf16); the local kernel over one half's slice (H %lld) "
                "launched into the first; µs, %d rounds\n",
                kChain, (long long)K, (long long)H, (long long)H, kReps);
  for (int64_t tokens : token_counts) {
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
    if (gemm_only) {
      gemm();
      CHECK(cudaDeviceSynchronize());
    } else {
      auto chain = [&] {
        for (int i = 0; i < kChain; ++i) gemm();
      };
      const float chain_alone = median_us(chain, sg, kReps);
      std::printf("tokens %lld: one GEMM %.1f µs, chain %.1f µs\n", (long long)tokens,
                  median_us(gemm, sg, kReps), chain_alone);
      // my slice of one source (rows x H); the d2d case copies it twice, as push + pull would
      const size_t slice_bytes = size_t(rows) * H * 2;
      struct Case { const char* name; int grid; };
      const Case cases[] = {{"none", -1},       {"load/store", 132}, {"load/store", 264},
                            {"load/store", 528}, {"load/store", 1024}, {"tma", 16},
                            {"tma", 32},         {"tma", 132},        {"d2d copy", 0}};
      constexpr int kCases = sizeof(cases) / sizeof(cases[0]);
      auto launch = [&](const Case& k) {
        if (k.grid < 0) return;  // the control: the chain alone, timed the same way
        if (k.grid == 0)         // the copy engines moving the slice's bytes twice (push + pull)
          CHECK(cudaMemcpyAsync(p.out_slots[0], p.partial, 2 * slice_bytes,
                                cudaMemcpyDeviceToDevice, sk));
        else if (k.name[0] == 't')
          weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>
              <<<k.grid, weave::kCeTmaThreads, weave::ce_tma_smem_bytes(2, H), sk>>>(p);
        else
          weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2><<<k.grid, weave::kThreads, 0, sk>>>(p);
      };
      float alone[kCases];
      for (int j = 0; j < kCases; ++j)
        alone[j] = cases[j].grid < 0 ? 0.f : median_us([&] { launch(cases[j]); }, sk, kReps);
      for (int64_t delay : delays) {
        std::printf("  kernel launched %lld µs into the chain\n", (long long)delay);
        std::printf("  %-12s %5s | %8s | %8s %8s %16s | %8s\n", "kernel", "grid", "alone",
                    "chain+k", "cost", "[p25, p75]", "hidden");
        // Rounds over all cases (interleaved, so that clock and power drift hit them alike); a
        // case's cost in a round is its makespan minus the control's in the same round.
        cudaEvent_t e0, eg, ek;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&eg));
        CHECK(cudaEventCreate(&ek));
        std::vector<float> span[kCases], cost[kCases];
        for (int r = 0; r < kReps + 2; ++r) {
          float round[kCases];
          for (int j = 0; j < kCases; ++j) {
            CHECK(cudaEventRecord(e0, sg));
            chain();
            CHECK(cudaEventRecord(eg, sg));
            host_wait_us(static_cast<int>(delay));
            launch(cases[j]);
            CHECK(cudaEventRecord(ek, sk));
            CHECK(cudaDeviceSynchronize());
            float g, kk;
            CHECK(cudaEventElapsedTime(&g, e0, eg));
            CHECK(cudaEventElapsedTime(&kk, e0, ek));
            round[j] = std::max(g, kk) * 1e3f;
          }
          if (r < 2) continue;  // warm-up rounds
          for (int j = 0; j < kCases; ++j) {
            span[j].push_back(round[j]);
            cost[j].push_back(round[j] - round[0]);
          }
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventDestroy(e0));
        CHECK(cudaEventDestroy(eg));
        CHECK(cudaEventDestroy(ek));
        for (int j = 0; j < kCases; ++j) {
          for (auto* v : {&span[j], &cost[j]}) std::sort(v->begin(), v->end());
          const size_t n = cost[j].size();
          const float med = cost[j][n / 2];
          std::printf("  %-12s %5d | %8.1f | %8.1f %8.1f [%6.1f, %6.1f] | %8.1f\n", cases[j].name,
                      cases[j].grid, alone[j], span[j][n / 2], med, cost[j][n / 4],
                      cost[j][3 * n / 4], alone[j] - med);
        }
      }
    }
    for (void* x : {(void*)a, (void*)w, (void*)c}) CHECK(cudaFree(x));
    free_ce_slice(p);
  }
  CHECK_BLAS(cublasDestroy(blas));
  return 0;
}
