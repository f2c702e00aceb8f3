#!/usr/bin/env bash
# Set up, fetch the demo model and sample data, and start everything on this machine:
#   scripts/up.sh [lorafleet up options...]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "==> preparing the data folder (demo model and sample datasets)"
.venv/bin/lorafleet init
exec .venv/bin/lorafleet up "$@"
