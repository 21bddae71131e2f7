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

# System packages the tests drive, installed with apt-get when missing (as root, e.g. in CI):
# Debian's chromium for the console's browser tests (Playwright drives it; it never downloads a
# browser of its own), Debian's redis-server for the cluster tests, openssl, which makes the
# throwaway certificates of the TLS tests, and Debian's prometheus for its promtool, which checks
# and unit-tests deploy/prometheus/alerts.yml. Tests that need one skip, saying why, only when
# this install failed.
ensure_system_packages() {
  local missing=() lean=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # the cluster tests' Redis
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # promtool comes with Debian's prometheus; not the node exporter it recommends
  command -v promtool >/dev/null 2>&1 || lean+=(prometheus)
  local all=("${missing[@]}" "${lean[@]}")
  (( ${#all[@]} )) || return 0
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test: ${all[*]} missing and cannot be installed here (needs root and apt-get); those tests skip" >&2
    return 0
  fi
  echo "scripts/test: installing ${all[*]} with apt-get" >&2
  { apt-get update -qq &&
    { (( ! ${#missing[@]} )) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } &&
    { (( ! ${#lean[@]} )) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}"; }
  } >/dev/null || echo "scripts/test: could not install ${all[*]}; those tests skip" >&2
}
