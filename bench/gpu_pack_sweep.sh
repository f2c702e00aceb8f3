#!/usr/bin/env bash
# Packs on one card: `lorafleet up` with one worker, then the sweep in bench/gpu_pack_sweep.yaml
# (SHAPE=8b: bench/gpu_pack_sweep_8b.yaml) with pack: auto and pack: off (bench/gpu_pack_sweep.py).
#   OUT=/some/folder [SHAPE=1b|8b] bench/gpu_pack_sweep.sh
set -u
OUT=${OUT:-/tmp/lorafleet-packs}
SHAPE=${SHAPE:-1b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFLEET_HOME=${LORAFLEET_HOME:-/tmp/lorafleet-packs-home} LORAFLEET_PORT=8765
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
if [ "$SHAPE" = 8b ]; then MODEL=llama-3-8b-random SWEEP=bench/gpu_pack_sweep_8b.yaml SHAPE_NAME=llama-3-8b
else MODEL=llama-3.2-1b-random SWEEP=bench/gpu_pack_sweep.yaml SHAPE_NAME=llama-3.2-1b; fi
[ -f "$LORAFLEET_HOME/models/$MODEL/config.json" ] || timeout -k 5 300 python3 -m bench.random_model \
    "$LORAFLEET_HOME/models/$MODEL" --shape $SHAPE_NAME > "$OUT/model.log" 2>&1 || { tail "$OUT/model.log"; exit 1; }
python3 - <<'PY'
import json, random
from dispatcher.settings import Settings
p = Settings.from_env().paths
p.ensure()
rng = random.Random(0)
words = "the sea is wide and deep and the waves are grey and green".split()
(p.datasets / "long.json").write_text(json.dumps(
    [{"text": " ".join(rng.choice(words) for _ in range(3000))} for _ in range(128)]))
(p.formats / "text.json").write_text(json.dumps({"text": "%text%"}))
PY
fleet_up
timeout -k 5 "${BUDGET:-500}" python3 -m bench.gpu_pack_sweep --sweep "$SWEEP" --model "$MODEL" \
    --order "${ORDER:-auto,off}" --out "$OUT/packs-$SHAPE.json"
echo "driver exit $?"
kill -INT $UP
timeout 60 tail --pid=$UP -f /dev/null
tar czf "$OUT/pack_logs.tgz" -C "$LORAFLEET_HOME" logs
