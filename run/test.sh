#!/usr/bin/env bash
# The test suite: sets up .venv on first use (with JAX's CUDA plugin where there is an NVIDIA
# driver), then runs pytest. GPU tests skip where JAX sees no GPU.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
exec "$WEAVE_PY" -m pytest -q "$@"
