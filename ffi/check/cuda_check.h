// CHECK(x): a CUDA runtime call that must succeed; otherwise print the call, where it stands and
// CUDA's message, and exit(1).  For the standalone check and benchmark programs; the
// library itself returns its errors to XLA instead (WS_CHECK in workspace.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,               \
                   cudaGetErrorString(e_));                                        \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)
