// Workspace of the fused kernel: allocation per device (cudaMalloc, outside XLA's allocator),
// peer wiring (one process: peer pointers; one process per GPU: CUDA IPC), the peer-access
// probe, error records, and the C API that weave_jax.fused calls through ctypes.
//
// Memory footprint per device, with Tmax max tokens, H hidden, B bytes per element (2),
// world ranks, Smax = ceil(Tmax / world) and num_slots output slots (default 2):
//   in_slot                      world * Smax * H * B   (~ Tmax * H * B)
//   out_slot   x num_slots       world * Smax * H * B each (in_slot and out_slot: >= 32 KiB, the
//                                peer probes' blocks)
//   os_slot                      2 * (world + 1) * Tos * H * B, Tos = max(1, min(Tmax, 1 MiB / (H * B)))
//                                (one-shot staging: <= 2 * (world + 1) MiB, 6 MiB at world 2)
//   pads + epochs + claim        20 KiB + 528 B + 4 B
//   error record, phase stamps   24 B + 8 KiB of pinned host memory (mapped)
// e.g. Tmax = 32768, H = 8192, bf16, world 2, 2 slots: 512 MiB * 3 + 6 MiB = 1.5 GiB + 6 MiB.
// Three library streams per device: `side` (normal priority), for start calls; `ce_push` and
// `ce_pull`, the copy-engine algorithm's copy streams, with 2 * kMaxCeChunks + 2 events per
// device and one process-wide host rendezvous (one process driving every GPU only).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "workspace.h"

namespace weave {

static DeviceWorkspace g_workspaces[kMaxDevices];
static HostRendezvous g_rendezvous;  // the one local group (weave_ws_init_local)

DeviceWorkspace& workspace(int ordinal) { return g_workspaces[ordinal]; }

}  // namespace weave

using weave::DeviceWorkspace;

#define WS_CHECK(call)                                                                     \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      snprintf(errbuf, errlen, "%s: %s failed: %s (%s:%d)", __func__, #call,               \
               cudaGetErrorString(e_), __FILE__, __LINE__);                                \
      return -1;                                                                           \
    }                                                                                      \
  } while (0)

namespace {

constexpr size_t kStampBytes = weave::kMaxCtas * weave::kStamps * sizeof(uint64_t);

__global__ void probe_kernel(uint32_t* peer, uint32_t* readback, uint32_t seed, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) peer[i] = seed ^ (static_cast<uint32_t>(i) * 2654435761u);
  __threadfence_system();
  __syncthreads();
  if (i < n) readback[i] = static_cast<volatile uint32_t*>(peer)[i];
}

// The peer probes (local and IPC): rank `writer` writes kProbeWords words, word k =
// probe_seed(writer, owner) ^ (k * 2654435761), into rank `owner`'s out_slot[0].
constexpr int kProbeWords = 1024;

uint32_t probe_seed(int writer, int owner) {
  return 0x9e3779b9u * (writer * weave::kMaxRanks + owner + 1);
}

int check_pattern(const uint32_t* words, uint32_t seed) {
  for (int k = 0; k < kProbeWords; ++k)
    if (words[k] != (seed ^ (static_cast<uint32_t>(k) * 2654435761u))) return -2;
  return 0;
}

int alloc_local(DeviceWorkspace& w, int ordinal, int rank, int world, int64_t max_tokens,
                int64_t hidden, int dtype_bytes, int num_slots, char* errbuf, int errlen) {
  w = DeviceWorkspace{};
  w.ordinal = ordinal;
  w.rank = rank;
  w.world = world;
  w.max_tokens = max_tokens;
  w.hidden = hidden;
  w.dtype_bytes = dtype_bytes;
  w.num_slots = num_slots;
  const size_t res = static_cast<size_t>((max_tokens + world - 1) / world) * hidden * dtype_bytes;
  // world * ceil(Tmax / world) rows, and at least the peer probes' blocks (kMaxRanks * 4 KiB)
  const size_t slot =
      std::max<size_t>(res * world, weave::kMaxRanks * kProbeWords * sizeof(uint32_t));
  WS_CHECK(cudaSetDevice(ordinal));
  WS_CHECK(cudaDeviceGetAttribute(&w.sm_major, cudaDevAttrComputeCapabilityMajor, ordinal));
  WS_CHECK(weave::preload_kernels(w.sm_major));
  WS_CHECK(cudaMalloc(&w.in_slot, slot));
  for (int s = 0; s < num_slots; ++s) WS_CHECK(cudaMalloc(&w.out_slot[s], slot));
  w.os_rows = weave::kOneShotBytes / (hidden * dtype_bytes);
  w.os_rows = w.os_rows < 1 ? 1 : (w.os_rows > max_tokens ? max_tokens : w.os_rows);
  WS_CHECK(cudaMalloc(&w.os_slot, static_cast<size_t>(2 * (world + 1)) * w.os_rows * hidden * dtype_bytes));
  WS_CHECK(cudaMalloc(&w.pads, weave::kPadWords * sizeof(uint32_t)));
  WS_CHECK(cudaMemset(w.pads, 0, weave::kPadWords * sizeof(uint32_t)));
  WS_CHECK(cudaMalloc(&w.epochs, weave::kEpochWords * sizeof(uint32_t)));
  WS_CHECK(cudaMemset(w.epochs, 0, weave::kEpochWords * sizeof(uint32_t)));
  WS_CHECK(cudaMalloc(&w.claim, sizeof(int32_t)));
  WS_CHECK(cudaMemset(w.claim, 0, sizeof(int32_t)));
  WS_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&w.err_host), sizeof(weave::ErrorRecord),
                         cudaHostAllocMapped | cudaHostAllocPortable));
  memset(w.err_host, 0, sizeof(weave::ErrorRecord));
  WS_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&w.err_dev), w.err_host, 0));
  WS_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&w.stamps_host), kStampBytes,
                         cudaHostAllocMapped | cudaHostAllocPortable));
  memset(w.stamps_host, 0, kStampBytes);
  WS_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&w.stamps_dev), w.stamps_host, 0));
  WS_CHECK(cudaStreamCreateWithFlags(&w.side, cudaStreamNonBlocking));
  WS_CHECK(cudaEventCreateWithFlags(&w.ev_inputs, cudaEventDisableTiming));
  WS_CHECK(cudaEventCreateWithFlags(&w.ev_last, cudaEventDisableTiming));
  WS_CHECK(cudaStreamCreateWithFlags(&w.ce_push, cudaStreamNonBlocking));
  WS_CHECK(cudaStreamCreateWithFlags(&w.ce_pull, cudaStreamNonBlocking));
  WS_CHECK(cudaEventCreateWithFlags(&w.ev_ce_begin, cudaEventDisableTiming));
  WS_CHECK(cudaEventCreateWithFlags(&w.ev_pulled, cudaEventDisableTiming));
  for (int c = 0; c < weave::kMaxCeChunks; ++c) {
    WS_CHECK(cudaEventCreateWithFlags(&w.ev_pushed[c], cudaEventDisableTiming));
    WS_CHECK(cudaEventCreateWithFlags(&w.ev_reduced[c], cudaEventDisableTiming));
  }
  for (int s = 0; s < num_slots; ++s)
    WS_CHECK(cudaEventCreateWithFlags(&w.ev_done[s], cudaEventDisableTiming));
  // ev_last must have been recorded once before anyone waits on it
  WS_CHECK(cudaEventRecord(w.ev_last, w.side));
  WS_CHECK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace

extern "C" {

// One process driving `n` devices; ordinals[i] is rank i.  Enables peer access between every
// pair and fills the peer pointers.  Returns 0, or -1 with a message in errbuf.
int weave_ws_init_local(int n, const int* ordinals, int64_t max_tokens, int64_t hidden,
                        int dtype_bytes, int num_slots, char* errbuf, int errlen) {
  if (n < 2 || n > weave::kMaxRanks || num_slots < 1 || num_slots > weave::kMaxSlots) {
    snprintf(errbuf, errlen, "weave_ws_init_local: bad world %d or num_slots %d", n, num_slots);
    return -1;
  }
  for (int i = 0; i < n; ++i) {
    if (alloc_local(weave::workspace(ordinals[i]), ordinals[i], i, n, max_tokens, hidden,
                    dtype_bytes, num_slots, errbuf, errlen) != 0)
      return -1;
  }
  for (int i = 0; i < n; ++i) {
    WS_CHECK(cudaSetDevice(ordinals[i]));
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      int can = 0;
      WS_CHECK(cudaDeviceCanAccessPeer(&can, ordinals[i], ordinals[j]));
      if (!can) {
        snprintf(errbuf, errlen, "weave_ws_init_local: device %d cannot access peer %d",
                 ordinals[i], ordinals[j]);
        return -2;
      }
      cudaError_t e = cudaDeviceEnablePeerAccess(ordinals[j], 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // already on (XLA may have enabled it): fine
      } else if (e != cudaSuccess) {
        snprintf(errbuf, errlen, "weave_ws_init_local: cudaDeviceEnablePeerAccess(%d -> %d): %s",
                 ordinals[i], ordinals[j], cudaGetErrorString(e));
        return -2;
      }
    }
  }
  for (auto& point : weave::g_rendezvous.arrived)
    for (auto& count : point) count.store(0);
  weave::g_rendezvous.broken.store(false);
  for (int i = 0; i < n; ++i) {
    DeviceWorkspace& w = weave::workspace(ordinals[i]);
    w.rendezvous = &weave::g_rendezvous;
    for (int j = 0; j < n; ++j) {
      const DeviceWorkspace& p = weave::workspace(ordinals[j]);
      w.peer_in[j] = p.in_slot;
      w.peer_pads[j] = p.pads;
      w.peer_os[j] = p.os_slot;
      w.peer_ordinal[j] = ordinals[j];
      for (int s = 0; s < num_slots; ++s) w.peer_out[s][j] = p.out_slot[s];
    }
    w.ready = true;
  }
  return 0;
}

// Real write/read-back through peer pointers: device i's kernel writes a pattern into device
// j's out_slot[0] and reads it back; the host then checks both the read-back and j's memory.
// Returns 0 when every pair works, -2 when a pair gives wrong data, -1 on a CUDA error.
int weave_ws_probe(int n, const int* ordinals, char* errbuf, int errlen) {
  uint32_t host[kProbeWords];
  for (int i = 0; i < n; ++i) {
    DeviceWorkspace& w = weave::workspace(ordinals[i]);
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      const uint32_t seed = probe_seed(i, j);
      uint32_t* readback = nullptr;
      WS_CHECK(cudaSetDevice(ordinals[i]));
      WS_CHECK(cudaMalloc(&readback, sizeof(host)));
      probe_kernel<<<kProbeWords / 256, 256>>>(static_cast<uint32_t*>(w.peer_out[0][j]), readback,
                                               seed, kProbeWords);
      WS_CHECK(cudaGetLastError());
      WS_CHECK(cudaDeviceSynchronize());
      WS_CHECK(cudaMemcpy(host, readback, sizeof(host), cudaMemcpyDeviceToHost));
      WS_CHECK(cudaFree(readback));
      if (check_pattern(host, seed) != 0) {
        snprintf(errbuf, errlen, "peer probe: device %d read back wrong data from device %d",
                 ordinals[i], ordinals[j]);
        return -2;
      }
      WS_CHECK(cudaSetDevice(ordinals[j]));
      WS_CHECK(cudaMemcpy(host, weave::workspace(ordinals[j]).out_slot[0], sizeof(host),
                          cudaMemcpyDeviceToHost));
      if (check_pattern(host, seed) != 0) {
        snprintf(errbuf, errlen, "peer probe: device %d's stores did not land on device %d",
                 ordinals[i], ordinals[j]);
        return -2;
      }
    }
  }
  return 0;
}

// ---- one process per GPU (jax.distributed): CUDA IPC.  Verified on 2 x H200 (2026-11-30,
// tests/test_ipc_gpu.py): export, open, the probe below and the kernels through IPC mappings.
constexpr int kIpcHandles = 3 + weave::kMaxSlots;  // in_slot, pads, os_slot, out_slot[kMaxSlots]

int weave_ws_ipc_handle_bytes() { return kIpcHandles * static_cast<int>(sizeof(cudaIpcMemHandle_t)); }

// Allocate this process's workspace and export its handles into `handles_out`
// (weave_ws_ipc_handle_bytes() bytes).
int weave_ws_init_ipc_export(int ordinal, int rank, int world, int64_t max_tokens, int64_t hidden,
                             int dtype_bytes, int num_slots, uint8_t* handles_out, char* errbuf,
                             int errlen) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  if (alloc_local(w, ordinal, rank, world, max_tokens, hidden, dtype_bytes, num_slots, errbuf,
                  errlen) != 0)
    return -1;
  cudaIpcMemHandle_t h[kIpcHandles] = {};
  WS_CHECK(cudaIpcGetMemHandle(&h[0], w.in_slot));
  WS_CHECK(cudaIpcGetMemHandle(&h[1], w.pads));
  WS_CHECK(cudaIpcGetMemHandle(&h[2], w.os_slot));
  for (int s = 0; s < num_slots; ++s) WS_CHECK(cudaIpcGetMemHandle(&h[3 + s], w.out_slot[s]));
  memcpy(handles_out, h, sizeof(h));
  return 0;
}

// Open every peer's handles (all_handles: world blocks of weave_ws_ipc_handle_bytes(), in rank
// order) and mark the workspace ready.
int weave_ws_init_ipc_open(int ordinal, const uint8_t* all_handles, char* errbuf, int errlen) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  WS_CHECK(cudaSetDevice(ordinal));
  for (int q = 0; q < w.world; ++q) {
    if (q == w.rank) {
      w.peer_in[q] = w.in_slot;
      w.peer_pads[q] = w.pads;
      w.peer_os[q] = w.os_slot;
      for (int s = 0; s < w.num_slots; ++s) w.peer_out[s][q] = w.out_slot[s];
      continue;
    }
    cudaIpcMemHandle_t h[kIpcHandles];
    memcpy(h, all_handles + q * sizeof(h), sizeof(h));
    WS_CHECK(cudaIpcOpenMemHandle(&w.peer_in[q], h[0], cudaIpcMemLazyEnablePeerAccess));
    WS_CHECK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&w.peer_pads[q]), h[1],
                                  cudaIpcMemLazyEnablePeerAccess));
    WS_CHECK(cudaIpcOpenMemHandle(&w.peer_os[q], h[2], cudaIpcMemLazyEnablePeerAccess));
    for (int s = 0; s < w.num_slots; ++s)
      WS_CHECK(cudaIpcOpenMemHandle(&w.peer_out[s][q], h[3 + s], cudaIpcMemLazyEnablePeerAccess));
  }
  w.ipc = true;
  w.ready = true;
  return 0;
}

// The IPC workspace's write/read-back probe, in two steps with a barrier of every rank between
// them (the caller's, through the distributed key-value store):
//   write: for every peer q, this rank's kernel writes a pattern into ITS block of q's
//          out_slot[0] (block = my rank, kProbeWords words) through the IPC mapping and reads
//          it back over NVLink;
//   check: after every rank wrote, the host reads every peer's block of MY out_slot[0] and
//          checks that peer's pattern landed.
// Nothing else touches out_slot[0] before the first call, so the blocks cannot collide.
// Returns 0 when every check passes, -2 on wrong data, -1 on a CUDA error.
int weave_ws_probe_ipc_write(int ordinal, char* errbuf, int errlen) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  if (!w.ready || !w.ipc) {
    snprintf(errbuf, errlen, "ipc probe: device %d has no IPC workspace", ordinal);
    return -1;
  }
  uint32_t host[kProbeWords];
  uint32_t* readback = nullptr;
  WS_CHECK(cudaSetDevice(ordinal));
  WS_CHECK(cudaMalloc(&readback, sizeof(host)));
  for (int q = 0; q < w.world; ++q) {
    if (q == w.rank) continue;
    uint32_t* block = static_cast<uint32_t*>(w.peer_out[0][q]) + w.rank * kProbeWords;
    probe_kernel<<<kProbeWords / 256, 256>>>(block, readback, probe_seed(w.rank, q), kProbeWords);
    WS_CHECK(cudaGetLastError());
    WS_CHECK(cudaDeviceSynchronize());
    WS_CHECK(cudaMemcpy(host, readback, sizeof(host), cudaMemcpyDeviceToHost));
    if (check_pattern(host, probe_seed(w.rank, q)) != 0) {
      cudaFree(readback);
      snprintf(errbuf, errlen, "ipc probe: rank %d read back wrong data from rank %d's memory",
               w.rank, q);
      return -2;
    }
  }
  WS_CHECK(cudaFree(readback));
  return 0;
}

int weave_ws_probe_ipc_check(int ordinal, char* errbuf, int errlen) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  uint32_t host[kProbeWords];
  WS_CHECK(cudaSetDevice(ordinal));
  for (int q = 0; q < w.world; ++q) {
    if (q == w.rank) continue;
    WS_CHECK(cudaMemcpy(host, static_cast<uint32_t*>(w.out_slot[0]) + q * kProbeWords,
                        sizeof(host), cudaMemcpyDeviceToHost));
    if (check_pattern(host, probe_seed(q, w.rank)) != 0) {
      snprintf(errbuf, errlen, "ipc probe: rank %d's stores did not land in rank %d's memory", q,
               w.rank);
      return -2;
    }
  }
  return 0;
}

// Free every workspace (peers' IPC mappings closed first).  Safe to call twice.
int weave_ws_free_all(char* errbuf, int errlen) {
  for (int d = 0; d < weave::kMaxDevices; ++d) {
    DeviceWorkspace& w = weave::workspace(d);
    if (w.ordinal < 0) continue;
    cudaSetDevice(d);
    cudaDeviceSynchronize();
    if (w.ipc) {
      for (int q = 0; q < w.world; ++q) {
        if (q == w.rank) continue;
        if (w.peer_in[q]) cudaIpcCloseMemHandle(w.peer_in[q]);
        if (w.peer_pads[q]) cudaIpcCloseMemHandle(w.peer_pads[q]);
        if (w.peer_os[q]) cudaIpcCloseMemHandle(w.peer_os[q]);
        for (int s = 0; s < w.num_slots; ++s)
          if (w.peer_out[s][q]) cudaIpcCloseMemHandle(w.peer_out[s][q]);
      }
    }
    if (w.mc_in == nullptr) {  // VMM (multicast) buffers are released with the process
      cudaFree(w.in_slot);
      for (int s = 0; s < w.num_slots; ++s) cudaFree(w.out_slot[s]);
    }
    for (int s = 0; s < w.num_slots; ++s)
      if (w.ev_done[s]) cudaEventDestroy(w.ev_done[s]);
    cudaFree(w.os_slot);
    cudaFree(w.pads);
    cudaFree(w.epochs);
    cudaFree(w.claim);
    if (w.err_host) cudaFreeHost(w.err_host);
    if (w.stamps_host) cudaFreeHost(w.stamps_host);
    if (w.ev_inputs) cudaEventDestroy(w.ev_inputs);
    if (w.ev_last) cudaEventDestroy(w.ev_last);
    for (int c = 0; c < weave::kMaxCeChunks; ++c) {
      if (w.ev_pushed[c]) cudaEventDestroy(w.ev_pushed[c]);
      if (w.ev_reduced[c]) cudaEventDestroy(w.ev_reduced[c]);
    }
    if (w.ev_ce_begin) cudaEventDestroy(w.ev_ce_begin);
    if (w.ev_pulled) cudaEventDestroy(w.ev_pulled);
    if (w.ce_push) cudaStreamDestroy(w.ce_push);
    if (w.ce_pull) cudaStreamDestroy(w.ce_pull);
    if (w.side) cudaStreamDestroy(w.side);
    w = DeviceWorkspace{};
  }
  cudaGetLastError();
  (void)errbuf;
  (void)errlen;
  return 0;
}

// Host-mapped error record of `ordinal`: out = {code, rank, peer, barrier, block, epoch}.
// Plain host memory, so it is readable after the context died of the kernel's trap.
int weave_ws_read_error(int ordinal, int32_t* out) {
  const DeviceWorkspace& w = weave::workspace(ordinal);
  if (w.err_host == nullptr) return -1;
  const volatile weave::ErrorRecord* e = w.err_host;
  out[0] = e->code;
  out[1] = e->rank;
  out[2] = e->peer;
  out[3] = e->barrier;
  out[4] = e->block;
  out[5] = static_cast<int32_t>(e->epoch);
  return 0;
}

// Test aid: fill every output slot with 0xFF bytes (NaN in bf16 and fp16), so a row the kernel
// fails to deliver shows up as NaN.
int weave_ws_poison(int ordinal) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  if (!w.ready) return -1;
  const size_t res = static_cast<size_t>((w.max_tokens + w.world - 1) / w.world) * w.hidden * w.dtype_bytes;
  const size_t slot = res * w.world;
  if (cudaSetDevice(ordinal) != cudaSuccess) return -1;
  for (int s = 0; s < w.num_slots; ++s)
    if (cudaMemset(w.out_slot[s], 0xff, slot) != cudaSuccess) return -1;
  return cudaDeviceSynchronize() == cudaSuccess ? 0 : -1;
}

// Diagnostics: turn the kernels' phase stamps on or off (on: cleared to 0 first).  Takes effect
// at the next launch by a handler; the caller synchronizes before turning them on or reading.
int weave_ws_set_stamps(int ordinal, int on) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  if (w.stamps_host == nullptr) return -1;
  if (on) memset(w.stamps_host, 0, kStampBytes);
  w.stamps_on = on != 0;
  return 0;
}

// Copies the phase stamps of `ordinal` ([kMaxCtas][kStamps] ns of %globaltimer, 0 where a block
// did not record) into out (n words at most).  Returns the number of words copied, or -1.
int weave_ws_read_stamps(int ordinal, uint64_t* out, int n) {
  const DeviceWorkspace& w = weave::workspace(ordinal);
  if (w.stamps_host == nullptr) return -1;
  const int words = static_cast<int>(kStampBytes / sizeof(uint64_t));
  n = n < words ? n : words;
  const volatile uint64_t* src = w.stamps_host;
  for (int i = 0; i < n; ++i) out[i] = src[i];
  return n;
}

// Diagnostics: out[0] = synchronous-call handler invocations on `ordinal` since init, out[1] = how
// many of them ran under CUDA stream capture (see DeviceWorkspace::handler_calls).
int weave_ws_call_counts(int ordinal, uint64_t* out) {
  const DeviceWorkspace& w = weave::workspace(ordinal);
  if (!w.ready) return -1;
  out[0] = w.handler_calls;
  out[1] = w.captured_calls;
  return 0;
}

int weave_ws_set_timeout_ms(int ordinal, double ms) {
  DeviceWorkspace& w = weave::workspace(ordinal);
  if (w.ordinal < 0) return -1;
  w.timeout_ns = static_cast<uint64_t>(ms * 1e6);
  return 0;
}

}  // extern "C"
