#!/usr/bin/env bash
# A team on a multi-card GPU machine (bench/gpu_team.py): `lorafleet up --gpus all` with a
# worker per card, 8 short 4-bit jobs from two users, then the sweep in bench/gpu_sweep.yaml.
#   OUT=/some/folder bench/gpu_team.sh
set -u
OUT=${OUT:-/tmp/lorafleet-team}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFLEET_HOME=/tmp/lorafleet-team-home LORAFLEET_PORT=8765
rm -rf "$LORAFLEET_HOME"
# The dashboard wants its token (the data folder's .dashboard_token, 0600) on every API call.
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
MODEL=llama-3.2-1b-random
CARDS=$(nvidia-smi -L | wc -l)
timeout -k 5 300 python3 -m bench.random_model "$LORAFLEET_HOME/models/$MODEL" --shape llama-3.2-1b > "$OUT/model.log" 2>&1 || { tail "$OUT/model.log"; exit 1; }
python3 - <<'PY'
import json, random
from dispatcher.settings import Settings
from gpuworker.demo import copy_samples
p = Settings.from_env().paths
p.ensure(); copy_samples(p, log=lambda s: None)
rng = random.Random(0)
words = "the sea is wide and deep and the waves are grey and green".split()
(p.datasets / "long.json").write_text(json.dumps(
    [{"text": " ".join(rng.choice(words) for _ in range(3000))} for _ in range(64)]))
(p.formats / "text.json").write_text(json.dumps({"text": "%text%"}))
PY
install -m 600 /dev/null "$OUT/up.log"  # it holds the printed URL, with the token
python3 -m dispatcher.cli up --gpus all > "$OUT/up.log" 2>&1 < /dev/null &
UP=$!
for _ in $(seq 1 120); do
    n=$(lfcurl -f http://127.0.0.1:8765/api/v1/workers | grep -o '"alive":true' | wc -l)
    [ "$n" -ge "$CARDS" ] && break
    sleep 1
done
echo "cards: $CARDS, workers alive: $n"
if [ "$CARDS" -ge 2 ]; then
    # A process outside lorafleet takes 16 GiB of the last card: its worker must report it.
    python3 -c "import torch, time; x = torch.empty(16 << 30, dtype=torch.uint8, device='cuda:$((CARDS - 1))'); time.sleep(40)" > "$OUT/outside.log" 2>&1 < /dev/null &
    HOG=$!
    sleep 15
    lfcurl http://127.0.0.1:8765/api/v1/workers > "$OUT/workers_with_outside_use.json"
    echo "outside process pid $HOG"
    kill $HOG; wait $HOG 2>/dev/null
    sleep 4
fi
SWEEP=${SWEEP-bench/gpu_sweep.yaml}   # SWEEP= (empty): jobs only
timeout -k 5 "${BUDGET:-420}" python3 -m bench.gpu_team --model "$MODEL" --jobs "${JOBS:-8}" \
    ${SWEEP:+--sweep "$SWEEP"} --out "$OUT/team.json"
echo "driver exit $?"
kill -INT $UP
timeout 60 tail --pid=$UP -f /dev/null
tail -2 "$OUT/up.log"
tar czf "$OUT/team_logs.tgz" -C "$LORAFLEET_HOME" logs
