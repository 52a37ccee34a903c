#!/usr/bin/env bash
# The test suite: sets up .venv on first use (with JAX's CUDA plugin where there is an NVIDIA
# driver), then runs pytest. GPU tests skip where JAX sees no GPU.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
# Two workers where there is no GPU (CI's 2 cores); one process where GPU tests share the device.
workers=(-n "${WEAVE_TEST_WORKERS:-2}")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  workers=()
fi
exec "$WEAVE_PY" -m pytest -q "${workers[@]}" "$@"
