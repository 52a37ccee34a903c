# Sourced by run/test.sh and run/bench.sh: find Python >= 3.12, create .venv, install weave_jax.
# JAX >= 0.11 needs Python >= 3.12; pyenv's 3.12 is used when the default python is older.
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

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[setup] creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.weave_installed_$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing weave_jax[$EXTRAS] into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" >&2
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
