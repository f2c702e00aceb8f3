#!/usr/bin/env bash
# The engine's GPU cases through the real fleet (see bench/gpu_fleet_jobs.py).
#   OUT=/some/folder bench/gpu_fleet.sh
set -u
OUT=${OUT:-/tmp/lorafleet-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFLEET_HOME=/tmp/lorafleet-fleet LORAFLEET_PORT=8765
rm -rf "$LORAFLEET_HOME"
# The dashboard wants its token (the data folder's .dashboard_token, 0600) on every API call.
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
MODEL=llama-3.2-1b-random
timeout -k 5 300 python3 -m bench.random_model "$LORAFLEET_HOME/models/$MODEL" --shape llama-3.2-1b > /dev/null 2>&1 || exit 1
python3 - <<'PY'
import json, random
from dispatcher.settings import Settings
from gpuworker.demo import copy_samples, write_heldout_text
p = Settings.from_env().paths
p.ensure(); copy_samples(p, log=lambda s: None); write_heldout_text(p, log=lambda s: None)
rng = random.Random(0)
words = "the sea is wide and deep and the waves are grey and green".split()
(p.datasets / "long.json").write_text(json.dumps(
    [{"text": " ".join(rng.choice(words) for _ in range(9000))} for _ in range(64)]))
(p.formats / "text.json").write_text(json.dumps({"text": "%text%"}))
PY
fleet_up
timeout -k 5 480 python3 -m bench.gpu_fleet_jobs --model "$MODEL" --out "$OUT/fleet_jobs.json"
echo "driver exit $?"
kill -INT $UP
timeout 60 tail --pid=$UP -f /dev/null
tail -2 "$OUT/up.log"
tar czf "$OUT/fleet_logs.tgz" -C "$LORAFLEET_HOME" logs
