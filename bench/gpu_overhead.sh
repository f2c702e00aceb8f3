#!/usr/bin/env bash
# Per-job start-up overhead on a GPU worker, with and without the worker preloading the training
# libraries (LORAFLEET_PRELOAD). For each setting: `lorafleet up --gpus 0`, three short 4-bit
# jobs on a random Llama-3.2-1B-shaped model queued at once, then the worker log's timestamps:
# from the moment a job could start (its message arrived and the job before it ended) to its
# first line, to its tokenizer being loaded and to its first training step: a new pool child,
# the imports and the loading inside the job's time. A worker whose preloading initialised CUDA would
# stop with a message (gpuworker.worker.preload_libraries), so the jobs succeeding is the check.
#
#   OUT=/some/folder [PRELOADS="0 1"] bench/gpu_overhead.sh
set -u
OUT=${OUT:-/tmp/lorafleet-overhead}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFLEET_PORT=8766
# The dashboard wants its token (the data folder's .dashboard_token, 0600) on every API call.
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
MODEL_HOME=/tmp/lorafleet-overhead-model
timeout -k 5 300 python3 -m bench.random_model "$MODEL_HOME/llama-3.2-1b-random" \
    --shape llama-3.2-1b > "$OUT/model.log" 2>&1 || exit 1

for preload in ${PRELOADS:-0 1}; do
    export LORAFLEET_PRELOAD=$preload LORAFLEET_HOME=/tmp/lorafleet-overhead-$preload
    rm -rf "$LORAFLEET_HOME"; mkdir -p "$LORAFLEET_HOME/datasets" "$LORAFLEET_HOME/models"
    # A copy: a link that leads outside models/ is refused, as any such path is.
    cp -r "$MODEL_HOME/llama-3.2-1b-random" "$LORAFLEET_HOME/models/"
    cp formats/samples/alpaca-sample.json "$LORAFLEET_HOME/datasets/"
    install -m 600 /dev/null "$OUT/up-$preload.log"  # it holds the printed URL, with the token
    python3 -m dispatcher.cli up --gpus 0 > "$OUT/up-$preload.log" 2>&1 < /dev/null &
    UP=$!
    for _ in $(seq 1 120); do
        lfcurl -f "http://127.0.0.1:$LORAFLEET_PORT/api/v1/workers" | grep -q '"alive": *true' && break
        sleep 1
    done
    ids=()
    start=$(date +%s.%N)
    for n in 1 2 3; do
        cat > "$OUT/spec-$n.yaml" <<SPEC
lora_name: overhead-$n
base_model: llama-3.2-1b-random
dataset: alpaca-sample
format: alpaca-format
precision: 4bit
lora_rank: 16
micro_batch_size: 4
batch_size: 16
epochs: 1
warmup_steps: 0
SPEC
        ids+=("$(python3 -m dispatcher.cli --url "http://127.0.0.1:$LORAFLEET_PORT" submit "$OUT/spec-$n.yaml")")
    done
    for id in "${ids[@]}"; do
        timeout -k 5 300 python3 -m dispatcher.cli --url "http://127.0.0.1:$LORAFLEET_PORT" \
            logs -f "$id" > /dev/null 2>&1
        python3 -m dispatcher.cli --url "http://127.0.0.1:$LORAFLEET_PORT" status "$id"
    done
    end=$(date +%s.%N)
    echo "preload=$preload: 3 jobs in $(python3 -c "print(round($end-$start,1))") s from first submit to last end"
    grep -h "training libraries imported\|initialised CUDA" "$LORAFLEET_HOME/logs/worker-gpu0.log" \
        | sed "s/^/preload=$preload: /"
    kill -INT $UP; timeout 60 tail --pid=$UP -f /dev/null
    cp "$LORAFLEET_HOME/logs/worker-gpu0.log" "$OUT/worker-$preload.log"
    python3 - "$OUT/worker-$preload.log" "$preload" <<'PY'
import sys
from datetime import datetime
lines = open(sys.argv[1], errors="replace").read().splitlines()
tag = f"preload={sys.argv[2]}"


def t(line):
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


received, ended, marks = [], [], []  # marks[i]: first line, samples built, training starts
for line in lines:
    if "Task lorafleet.run_job" in line and line.endswith(" received"):
        received.append(t(line))
        marks.append({})
    elif "Task lorafleet.run_job" in line and " succeeded in " in line:
        ended.append(t(line))
    elif "lorafleet.worker [" in line and marks:
        m = marks[-1]
        m.setdefault("first line", t(line))
        if "Building samples" in line:
            m["tokenizer loaded"] = t(line)
        if "Starting training" in line:
            m["training starts"] = t(line)
    elif "training libraries imported in" in line:
        print(f"{tag}: {line[24:]}")
# A queued job's message can arrive while the one before still runs: job i can start at the
# later of its arrival and the previous job's end.
for i, (r, m) in enumerate(zip(received, marks)):
    ready = max(r, ended[i - 1]) if i else r
    print(f"{tag} job {i + 1}: " + ", ".join(
        f"{name} +{(when - ready).total_seconds():.1f} s" for name, when in m.items()))
PY
done
