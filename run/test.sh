#!/usr/bin/env bash
# The test suite: sets up .venv on first use, then runs pytest (GPU tests skip without a GPU).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
exec python -m pytest -q "$@"
