# Shared by scripts/*: create .venv when missing and install the project into it
# (re-installing only when pyproject.toml changed since the last install).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

ensure_venv() {  # ensure_venv [extra]
  local extra="${1:-}"
  local spec="$ROOT"
  [[ -n "$extra" ]] && spec="$ROOT[$extra]"
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
      echo "cachegate needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
      exit 1
    }
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-${extra:-base}"
  # The test extra installs the project too: a fresh one does for a plain ensure_venv.
  if [[ -z "$extra" && -f "$VENV/.installed-test" && ! "$ROOT/pyproject.toml" -nt "$VENV/.installed-test" ]]; then
    return 0
  fi
  if [[ ! -f "$stamp" || "$ROOT/pyproject.toml" -nt "$stamp" ]]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install --quiet -e "$spec"
    touch "$stamp"
  fi
}
