# Sourced by the bench scripts: curl to this fleet's dashboard with the data folder's token.
# The header comes from a file descriptor (curl -H @FILE), never from curl's command line,
# which every account on the machine can read.
lfcurl() {
    curl -s -H @<(printf 'Authorization: Bearer %s\n' \
        "$(cat "$LORAFLEET_HOME/.dashboard_token" 2>/dev/null)") "$@"
}

# Start `lorafleet up --gpus all` in the background (its output in $OUT/up.log, 0600: it holds
# the printed URL with the token), set UP to its pid, and wait (at most 2 min) until a worker
# is alive.
fleet_up() {
    install -m 600 /dev/null "$OUT/up.log"
    python3 -m dispatcher.cli up --gpus all > "$OUT/up.log" 2>&1 < /dev/null &
    UP=$!
    for _ in $(seq 1 120); do
        lfcurl -f "http://127.0.0.1:${LORAFLEET_PORT:-8765}/api/v1/workers" \
            | grep -q '"alive":true' && break
        sleep 1
    done
}
