# Sourced by run/test.sh and run/bench.sh as `source run/setup_env.sh EXTRA` (EXTRA: test or
# bench): finds Python >= 3.12, creates .venv and installs weave_jax[EXTRA] in editable mode,
# plus JAX's CUDA plugin on a machine with an NVIDIA driver (without it the plain jax
# dependency is CPU-only, and a GPU node would run everything on its CPU).  Leaves the
# interpreter to use in WEAVE_PY.
#
#   WEAVE_CUDA=12|13|none   which CUDA plugin. Default: none without an NVIDIA driver; 13 where
#                           the CUDA toolkit (nvcc, which builds the FFI library) is CUDA 13, so
#                           that the library and JAX use one CUDA; else 12 (jax[cuda12]). The
#                           driver must support the chosen CUDA (nvidia-smi "CUDA Version").
#   WEAVE_SETUP=none        use the Python on PATH as it is and install nothing (offline nodes
#                           where JAX, Flax and orbax are installed system-wide)
#   WEAVE_SETUP_DRY_RUN=1   print the install commands instead of running them
#   PYTHON=/path/python3    the interpreter for the venv; WEAVE_VENV=DIR where the venv goes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WEAVE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-test}"

find_python() {
  for cand in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare | grep -E '^3\.(1[2-9])' | sort -rV); do
      echo "$(pyenv root)/versions/$v/bin/python3"; return
    done
  fi
  echo "error: weave_jax needs Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# major CUDA version the driver supports ("CUDA Version: 13.0" in nvidia-smi's header)
driver_cuda_major() {
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1
}

# major version of the CUDA toolkit that would build the FFI library ("release 13.0" from nvcc)
toolkit_cuda_major() {
  local nvcc
  nvcc="$(command -v nvcc || true)"
  [ -n "$nvcc" ] || nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  [ -x "$nvcc" ] || return 0
  "$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p' | head -n 1
}

choose_cuda() {
  local want="${WEAVE_CUDA:-auto}" driver toolkit
  case "$want" in
    12|13|none|auto) ;;
    *) echo "error: WEAVE_CUDA must be 12, 13 or none, got '$want'" >&2; return 1 ;;
  esac
  if [ "$want" = none ]; then echo none; return; fi
  if ! has_nvidia_gpu; then
    if [ "$want" = auto ]; then echo none; return; fi
    echo "[setup] WEAVE_CUDA=$want without an NVIDIA driver here (no GPU in nvidia-smi -L)" >&2
    echo "$want"; return
  fi
  if [ "$want" = auto ]; then
    toolkit="$(toolkit_cuda_major)"
    if [ -n "$toolkit" ] && [ "$toolkit" -ge 13 ]; then want=13; else want=12; fi
  fi
  driver="$(driver_cuda_major)"
  if [ -n "$driver" ] && [ "$driver" -lt "$want" ]; then
    echo "error: jax[cuda$want] needs an NVIDIA driver for CUDA >= $want.0, and this one supports" \
         "CUDA $driver (nvidia-smi). Update the driver, or choose the plugin with WEAVE_CUDA=12|13." >&2
    return 1
  fi
  echo "$want"
}

run_step() {   # a command, or its printout under WEAVE_SETUP_DRY_RUN=1
  if [ "${WEAVE_SETUP_DRY_RUN:-0}" = 1 ]; then echo "[dry-run] $*"; else "$@"; fi
}

if [ "${WEAVE_SETUP:-}" = none ]; then
  WEAVE_PY="$(command -v python3)"
  echo "[setup] WEAVE_SETUP=none: using $WEAVE_PY as it is" >&2
  cd "$ROOT"
  return 0 2>/dev/null || exit 0
fi

CUDA="$(choose_cuda)"
if [ "$CUDA" != none ]; then EXTRAS="$EXTRAS,cuda$CUDA"; fi
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[setup] creating $VENV with $("$PY" --version)" >&2
  run_step "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.weave_installed_$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing weave_jax[$EXTRAS] into $VENV (first time: a few minutes)" >&2
  run_step "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  run_step "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" >&2
  run_step touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
WEAVE_PY="$VENV/bin/python"
cd "$ROOT"
