#!/usr/bin/env bash
# Set up the test environment (only what is missing or changed) and run the test suite:
#   scripts/test.sh                        the fast tier, then (when it passes) the slow tier
#   scripts/test.sh [pytest args...]       pytest with these arguments, e.g. -m "not browser" -x
# Tiers: "fast" is every test not marked integration or browser (pure logic, plus a real Redis
# server and tiny in-process training, about two minutes on two cores); "slow" is the rest (real
# processes, `lorafleet up`, headless Chromium; three at a time). A failure in the fast tier stops
# the run early.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --test

run_pytest() {
    echo "==> running pytest $*"
    local rc=0
    .venv/bin/python -m pytest "$@" || rc=$?
    if [ "$rc" = 5 ]; then
        echo "test.sh: FAILED: pytest collected no tests (exit code 5); check the arguments and tests/." >&2
    fi
    return "$rc"
}

if [ "$#" -gt 0 ]; then
    run_pytest "$@"
    exit
fi
echo "==> fast tier"
# Two test processes (one per core on a CI machine), a test file each at a time.
run_pytest -m "not integration and not browser" -n 2 --dist loadfile
echo "==> slow tier"
# Three test processes, one test file each at a time (a file's fleet fixture stays in one
# process): these tests mostly wait for their workers and browsers, so even two cores run them
# in about two thirds of the time.
run_pytest -m "integration or browser" -n 3 --dist loadfile
