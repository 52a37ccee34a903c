// The multicast gate.  This file holds the ONLY function of the project that may call any
// cuMulticast* driver entry point: weave_multicast_create().  It first asks the pure policy
// function weave_multicast_policy() (multicast_policy.cc), which refuses unless the user opted
// in (WEAVE_ENABLE_MULTIMEM=1), nothing on the host disables NVLS, and every device reports
// CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED.
// Why: on shared hosts that forbid NVLink multicast, creating a multicast object can take all
// GPUs of the host out of service for a day (DESIGN.md, "Multicast safety").
//
// Driver API calls go through cudaGetDriverEntryPointByVersion: the library links the CUDA
// runtime statically and does not link libcuda, so it loads on machines with no driver (CI).
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "multicast_policy.h"
#include "workspace.h"

extern "C" {

// The one creator.  Single process driving `n` devices (ordinals, in rank order) whose
// workspaces already exist: replaces their in_slot / out_slot buffers with VMM allocations
// bound to one multicast object per buffer, and stores the multicast addresses.
// Returns 0 on success, the policy code (> 0) on refusal, -1 on a driver error (message in
// errbuf).  UNVERIFIED: never run on the project's hosts, which forbid multicast.
int weave_multicast_create(int n, const int* ordinals, char* errbuf, int errlen) {
  auto fail = [&](const char* what, int rc) {
    snprintf(errbuf, errlen, "weave_multicast_create: %s failed (%d)", what, rc);
    return -1;
  };
  auto entry = [](const char* name) -> void* {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion(name, &fn, 12010, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return fn;
  };
  // 1. device support, then the policy, before anything multicast is touched
  using GetAttr = CUresult (*)(int*, CUdevice_attribute, CUdevice);
  auto get_attr = reinterpret_cast<GetAttr>(entry("cuDeviceGetAttribute"));
  int supported = get_attr != nullptr && n >= 2;
  for (int i = 0; supported && i < n; ++i) {
    int v = 0;
    if (get_attr(&v, CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED, ordinals[i]) != CUDA_SUCCESS) v = 0;
    supported = supported && v;
  }
  const int policy = weave_multicast_policy(supported);
  if (policy != weave::kMulticastAllowed) {
    snprintf(errbuf, errlen, "multicast refused: %s", weave_multicast_policy_reason(policy));
    return policy;
  }
  // 2. allowed: build one multicast object per buffer (in_slot, out_slot[s])
  using McCreate = CUresult (*)(CUmemGenericAllocationHandle*, const CUmulticastObjectProp*);
  using McAddDevice = CUresult (*)(CUmemGenericAllocationHandle, CUdevice);
  using McBindMem = CUresult (*)(CUmemGenericAllocationHandle, size_t, CUmemGenericAllocationHandle,
                                 size_t, size_t, unsigned long long);
  using McGranularity = CUresult (*)(size_t*, const CUmulticastObjectProp*,
                                     CUmulticastGranularity_flags);
  using MemCreate = CUresult (*)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                                 unsigned long long);
  using AddrReserve = CUresult (*)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  using MemMap = CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                              unsigned long long);
  using SetAccess = CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  auto mc_create = reinterpret_cast<McCreate>(entry("cuMulticastCreate"));
  auto mc_add = reinterpret_cast<McAddDevice>(entry("cuMulticastAddDevice"));
  auto mc_bind = reinterpret_cast<McBindMem>(entry("cuMulticastBindMem"));
  auto mc_gran = reinterpret_cast<McGranularity>(entry("cuMulticastGetGranularity"));
  auto mem_create = reinterpret_cast<MemCreate>(entry("cuMemCreate"));
  auto addr_reserve = reinterpret_cast<AddrReserve>(entry("cuMemAddressReserve"));
  auto mem_map = reinterpret_cast<MemMap>(entry("cuMemMap"));
  auto set_access = reinterpret_cast<SetAccess>(entry("cuMemSetAccess"));
  if (!mc_create || !mc_add || !mc_bind || !mc_gran || !mem_create || !addr_reserve || !mem_map ||
      !set_access)
    return fail("driver entry point lookup", 0);

  weave::DeviceWorkspace& w0 = weave::workspace(ordinals[0]);
  const int num_buffers = 1 + w0.num_slots;
  const size_t bytes = static_cast<size_t>((w0.max_tokens + w0.world - 1) / w0.world) * w0.world *
                       w0.hidden * w0.dtype_bytes;
  CUmulticastObjectProp mprop = {};
  mprop.numDevices = n;
  mprop.size = bytes;
  size_t gran = 0;
  if (int rc = mc_gran(&gran, &mprop, CU_MULTICAST_GRANULARITY_RECOMMENDED)) return fail("cuMulticastGetGranularity", rc);
  const size_t size = (bytes + gran - 1) / gran * gran;
  mprop.size = size;
  CUmemAccessDesc access[weave::kMaxRanks] = {};
  for (int i = 0; i < n; ++i) {
    access[i].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access[i].location.id = ordinals[i];
    access[i].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  }
  for (int buf = 0; buf < num_buffers; ++buf) {
    CUmemGenericAllocationHandle mc;
    if (int rc = mc_create(&mc, &mprop)) return fail("cuMulticastCreate", rc);
    for (int i = 0; i < n; ++i)
      if (int rc = mc_add(mc, ordinals[i])) return fail("cuMulticastAddDevice", rc);
    CUdeviceptr uc_va[weave::kMaxRanks] = {};
    for (int i = 0; i < n; ++i) {
      cudaSetDevice(ordinals[i]);
      CUmemAllocationProp prop = {};
      prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = ordinals[i];
      CUmemGenericAllocationHandle phys;
      if (int rc = mem_create(&phys, size, &prop, 0)) return fail("cuMemCreate", rc);
      if (int rc = addr_reserve(&uc_va[i], size, gran, 0, 0)) return fail("cuMemAddressReserve", rc);
      if (int rc = mem_map(uc_va[i], size, 0, phys, 0)) return fail("cuMemMap", rc);
      if (int rc = set_access(uc_va[i], size, access, n)) return fail("cuMemSetAccess", rc);
      if (int rc = mc_bind(mc, 0, phys, 0, size, 0)) return fail("cuMulticastBindMem", rc);
    }
    for (int i = 0; i < n; ++i) {
      cudaSetDevice(ordinals[i]);
      CUdeviceptr mc_va;
      if (int rc = addr_reserve(&mc_va, size, gran, 0, 0)) return fail("cuMemAddressReserve(mc)", rc);
      if (int rc = mem_map(mc_va, size, 0, mc, 0)) return fail("cuMemMap(mc)", rc);
      if (int rc = set_access(mc_va, size, &access[i], 1)) return fail("cuMemSetAccess(mc)", rc);
      weave::DeviceWorkspace& w = weave::workspace(ordinals[i]);
      void* uc = reinterpret_cast<void*>(uc_va[i]);
      if (buf == 0) {
        cudaFree(w.in_slot);
        w.in_slot = uc;
        w.mc_in = reinterpret_cast<void*>(mc_va);
      } else {
        cudaFree(w.out_slot[buf - 1]);
        w.out_slot[buf - 1] = uc;
        w.mc_out[buf - 1] = reinterpret_cast<void*>(mc_va);
      }
      for (int j = 0; j < n; ++j) {
        void* peer_view = reinterpret_cast<void*>(uc_va[j]);
        if (buf == 0) w.peer_in[j] = peer_view; else w.peer_out[buf - 1][j] = peer_view;
      }
    }
  }
  return 0;
}

}  // extern "C"
