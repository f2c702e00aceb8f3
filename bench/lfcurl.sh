# Sourced by the bench scripts: curl to this fleet's dashboard with the data folder's token.
# The header comes from a file descriptor (curl -H @FILE), never from curl's command line,
# which every account on the machine can read.
lfcurl() {
    curl -s -H @<(printf 'Authorization: Bearer %s\n' \
        "$(cat "$LORAFLEET_HOME/.dashboard_token" 2>/dev/null)") "$@"
}
