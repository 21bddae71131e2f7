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
  if [[ ! -f "$stamp" || "$ROOT/pyproject.toml" -nt "$stamp" ]]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install --quiet -e "$spec"
    touch "$stamp"
  fi
}

ensure_commands() {  # ensure_commands COMMAND:PACKAGE ... (apt-get, when missing and allowed)
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 || -n "$sudo" ]]; then
    echo "installing ${missing[*]} with apt-get (tests need them)" >&2
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"; } >&2 \
      || echo "could not install ${missing[*]}: the tests that need them skip, saying why" >&2
  else
    echo "missing ${missing[*]} (no apt-get or no root): the tests that need them skip, saying why" >&2
  fi
}
