// The multicast gate's policy (multicast_policy.h).  It refuses unless
//   - the user opted in explicitly: WEAVE_ENABLE_MULTIMEM=1, AND
//   - nothing disables NVLS: NCCL_NVLS_ENABLE is not a false value, and neither
//     TORCH_SYMM_MEM_DISABLE_MULTICAST nor NVSHMEM_DISABLE_NVLS is set to anything but a false
//     value, AND
//   - every device reports multicast support (the caller's `device_supported`).
// Why: on shared hosts that forbid NVLink multicast, creating a multicast object can take all
// GPUs of the host out of service for a day (DESIGN.md, "Multicast safety").
#include "multicast_policy.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

// Values that turn a boolean-ish variable off.  Anything else counts as "on".
bool is_false_value(const char* v) {
  std::string s(v);
  for (auto& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s == "0" || s == "false" || s == "no" || s == "off" || s == "n" || s == "f";
}

}  // namespace

extern "C" {

// The disabling variables are checked before the opt-in, so a host that forbids NVLS reports
// why even to users who opted in.
int weave_multicast_policy(int device_supported) {
  if (const char* v = getenv("NCCL_NVLS_ENABLE"); v != nullptr && (v[0] == '\0' || is_false_value(v)))
    return weave::kMulticastNcclNvlsDisabled;
  if (const char* v = getenv("TORCH_SYMM_MEM_DISABLE_MULTICAST"); v != nullptr && !is_false_value(v))
    return weave::kMulticastTorchDisabled;
  if (const char* v = getenv("NVSHMEM_DISABLE_NVLS"); v != nullptr && !is_false_value(v))
    return weave::kMulticastNvshmemDisabled;
  const char* opt = getenv("WEAVE_ENABLE_MULTIMEM");
  if (opt == nullptr || strcmp(opt, "1") != 0) return weave::kMulticastNotOptedIn;
  if (!device_supported) return weave::kMulticastNoDeviceSupport;
  return weave::kMulticastAllowed;
}

const char* weave_multicast_policy_reason(int code) {
  switch (code) {
    case weave::kMulticastAllowed: return "allowed";
    case weave::kMulticastNotOptedIn: return "WEAVE_ENABLE_MULTIMEM=1 is not set (multicast is opt-in)";
    case weave::kMulticastNcclNvlsDisabled: return "NCCL_NVLS_ENABLE disables NVLS on this host";
    case weave::kMulticastTorchDisabled:
      return "TORCH_SYMM_MEM_DISABLE_MULTICAST disables multicast on this host";
    case weave::kMulticastNvshmemDisabled: return "NVSHMEM_DISABLE_NVLS disables NVLS on this host";
    case weave::kMulticastNoDeviceSupport:
      return "a device does not report CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED";
    default: return "unknown refusal";
  }
}

}  // extern "C"
