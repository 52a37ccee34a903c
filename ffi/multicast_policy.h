// The multicast gate's policy: whether this process may create NVLink multicast objects.
// Pure C++ (no CUDA): the library compiles it with the gate (multicast_gate.cu, the one file
// that may create multicast objects), and tests/test_multicast_gate.py compiles it alone with
// the host C++ compiler, so the refusals are proven on machines without a GPU or nvcc.
#pragma once

namespace weave {

enum MulticastPolicyCode : int {
  kMulticastAllowed = 0,
  kMulticastNotOptedIn = 1,
  kMulticastNcclNvlsDisabled = 2,
  kMulticastTorchDisabled = 3,
  kMulticastNvshmemDisabled = 4,
  kMulticastNoDeviceSupport = 5,
};

}  // namespace weave

extern "C" {

// Reads the environment, takes the device-support flag as an argument, creates nothing.
// Returns kMulticastAllowed (0) when multicast may be created, else the refusal's code.
int weave_multicast_policy(int device_supported);

// The reason for a policy code, for error messages.
const char* weave_multicast_policy_reason(int code);

}  // extern "C"
