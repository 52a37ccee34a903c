// Per-device workspace of the fused AllReduce + RMSNorm kernel: what the FFI handlers look up
// by device ordinal.  Allocation, peer/IPC wiring and the C API live in workspace.cu.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "fused_reduce_add_norm.cuh"

namespace weave {

constexpr int kMaxDevices = 64;
constexpr int kMaxSlots = 4;

// Where the handlers of one process's ranks meet on the host (copy-engine algorithm, see the
// kernel file): arrived[k][r] = how many calls rank r has brought to rendezvous k (0 "pushed",
// 1 "reduced").  broken: a rendezvous timed out; every later copy-engine call fails at once.
struct HostRendezvous {
  std::atomic<uint64_t> arrived[2][kMaxRanks];
  std::atomic<bool> broken;
};

struct DeviceWorkspace {
  bool ready = false;
  bool ipc = false;          // peers' buffers opened from CUDA IPC handles
  int ordinal = -1;
  int rank = -1;
  int world = 0;
  int64_t max_tokens = 0;    // Tmax
  int64_t hidden = 0;        // H
  int dtype_bytes = 2;
  int num_slots = 0;
  int sm_major = 0;          // compute capability major: >= 9 runs the two-shot TMA kernel
  // local allocations (cudaMalloc on this device)
  void* in_slot = nullptr;                  // (world * Smax, H), Smax = ceil(Tmax / world)
  void* out_slot[kMaxSlots] = {};           // (world * Smax, H) each
  void* os_slot = nullptr;                  // one-shot staging: 2 x (world + 1) x os_rows x H
  int64_t os_rows = 0;                      // Tos = max(1, min(Tmax, kOneShotBytes / (H * B)))
  uint32_t* pads = nullptr;                 // kPadWords
  uint32_t* epochs = nullptr;               // kEpochWords
  int32_t* claim = nullptr;                 // 1 word
  ErrorRecord* err_host = nullptr;          // cudaHostAllocMapped
  ErrorRecord* err_dev = nullptr;           // its device alias
  uint64_t* stamps_host = nullptr;          // phase stamps [kMaxCtas][kStamps], host-mapped
  uint64_t* stamps_dev = nullptr;           // its device alias
  bool stamps_on = false;                   // pass stamps_dev to the kernels (diagnostics)
  // as seen from this device: every rank's buffers (own ones included)
  void* peer_in[kMaxRanks] = {};
  void* peer_out[kMaxSlots][kMaxRanks] = {};
  uint32_t* peer_pads[kMaxRanks] = {};
  void* peer_os[kMaxRanks] = {};
  // CUDA ordinal of every rank (one process driving all GPUs), or -1 (IPC: peers' buffers are
  // mapped into this device's context)
  int peer_ordinal[kMaxRanks] = {-1, -1, -1, -1, -1, -1, -1, -1};
  // multicast addresses (MultimemTransport only; set by the gated creator)
  void* mc_in = nullptr;
  void* mc_out[kMaxSlots] = {};
  // streams and events
  cudaStream_t side = nullptr;              // library-owned stream for start/done
  cudaEvent_t ev_inputs = nullptr;          // XLA stream -> side stream (start's inputs ready)
  cudaEvent_t ev_done[kMaxSlots] = {};      // side stream -> XLA stream (slot results ready)
  cudaEvent_t ev_last = nullptr;            // last kernel launched on the side stream
  bool side_pending = false;                // a start launched since XLA's stream last waited
  uint64_t starts = 0;                      // starts launched since init
  uint64_t slot_start[kMaxSlots] = {};      // which start (1, 2, ...) each slot's event marks
  uint64_t done_upto = 0;                   // latest start a done made XLA's stream wait for
  // copy-engine algorithm (one process driving every GPU only)
  HostRendezvous* rendezvous = nullptr;     // shared by the ranks of this process's group
  uint64_t ce_calls = 0;                    // copy-engine calls made by this rank
  cudaStream_t ce_push = nullptr;           // push copies (non-blocking, normal priority)
  cudaStream_t ce_pull = nullptr;           // pull copies
  cudaEvent_t ev_ce_begin = nullptr;        // the call's stream reached the call
  cudaEvent_t ev_pushed[kMaxCeChunks] = {}; // my pushes of chunk c of the current call are done
  cudaEvent_t ev_reduced[kMaxCeChunks] = {};// my normalized rows of chunk c are ready (out_slot)
  cudaEvent_t ev_pulled = nullptr;          // my pulls of the current call are done
  uint64_t timeout_ns = 10ull * 1000 * 1000 * 1000;
  // Synchronous-call handler invocations since init, and how many of them ran under CUDA stream
  // capture (XLA recording a command buffer).  A replayed graph launches the kernel without
  // running the handler, so fewer invocations than calls executed proves replay.
  uint64_t handler_calls = 0;
  uint64_t captured_calls = 0;
};

DeviceWorkspace& workspace(int ordinal);

// Forces every kernel of the library to load on the current device, whose compute capability
// major is `sm_major` (handlers.cu).
cudaError_t preload_kernels(int sm_major);

}  // namespace weave
