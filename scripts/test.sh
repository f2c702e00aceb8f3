#!/usr/bin/env bash
# Set up the test environment and run the test suite:
#   scripts/test.sh [pytest args...]      e.g.  scripts/test.sh -m "not browser" -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --test
echo "==> running pytest $*"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" = 5 ]; then
    echo "test.sh: FAILED: pytest collected no tests (exit code 5); check the arguments and tests/." >&2
    exit 5
fi
exit "$rc"
