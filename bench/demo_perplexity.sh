#!/usr/bin/env bash
# On CPU with the real demo model: perplexity of SmolLM2-135M-Instruct on the held-out sample
# rows, then a LoRA trained on the sample dataset for a few minutes, then the perplexity again,
# all through the real fleet (`lorafleet up --gpus cpu`) and the CLI.
#
#   LORAFLEET_HOME=/path/with/demo/model bench/demo_perplexity.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LF=${LF:-.venv/bin/lorafleet}
export LORAFLEET_PORT=${LORAFLEET_PORT:-8790} LORAFLEET_EMBEDDED_REDIS_PORT=${LORAFLEET_EMBEDDED_REDIS_PORT:-6395}
URL="http://127.0.0.1:$LORAFLEET_PORT"
# The dashboard wants its token (the data folder's .dashboard_token, 0600) on every API call.
. "$(dirname "${BASH_SOURCE[0]}")/lfcurl.sh"  # lfcurl: curl with the dashboard token
$LF init >/dev/null
# up.out holds the printed URL, with the token: readable by this OS user only.
install -m 600 /dev/null "$LORAFLEET_HOME/up.out"
$LF up --gpus cpu > "$LORAFLEET_HOME/up.out" 2>&1 < /dev/null &
UP=$!
trap 'kill -INT $UP; wait $UP' EXIT
for _ in $(seq 1 60); do lfcurl -f "$URL/api/v1/workers" | grep -q '"alive":true' && break; sleep 1; done

spec=$(mktemp --suffix .yaml)
cat > "$spec" <<YAML
lora_name: ${LORA_NAME:-demo-marrowby}
base_model: SmolLM2-135M-Instruct
dataset: alpaca-sample
format: alpaca-format
precision: fp32
lora_rank: 16
lora_alpha: 32
target_modules: [${TARGETS:-q, v}]
micro_batch_size: 4
batch_size: 8
epochs: ${EPOCHS:-3}
learning_rate: "${LR:-3e-4}"
lr_scheduler_type: linear
warmup_steps: 2
cutoff_len: 256
YAML
echo "== perplexity of the base model on the held-out rows"
$LF evaluate --url "$URL" --model SmolLM2-135M-Instruct --text alpaca-heldout.txt --max-length 512 --stride 256 --force --wait 2>/dev/null | tail -1
echo "== training (${EPOCHS:-3} epochs of the 60-row sample dataset, lr ${LR:-3e-4}, on ${TARGETS:-q, v})"
start=$(date +%s)
$LF submit --url "$URL" "$spec" --wait 2> "$LORAFLEET_HOME/train.err" | tail -1
echo "trained in $(( $(date +%s) - start )) s; last line: $(tail -2 "$LORAFLEET_HOME/train.err" | head -1 | tr '\r' '\n' | tail -1)"
echo "== perplexity with the LoRA"
$LF evaluate --url "$URL" --model SmolLM2-135M-Instruct --lora "${LORA_NAME:-demo-marrowby}" --text alpaca-heldout.txt --max-length 512 --stride 256 --force --wait 2>/dev/null | tail -1
echo "== the same question, base vs LoRA (greedy)"
$LF generate --url "$URL" --model SmolLM2-135M-Instruct --lora "${LORA_NAME:-demo-marrowby}" --format alpaca-format \
    --prompt "Who founded Marrowby?" --temperature 0 --max-new-tokens 40 2>/dev/null | tail -n +2
