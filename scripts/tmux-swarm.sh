#!/usr/bin/env bash
# A coordinator and N workers on one box (sharing its GPU), one tmux window each,
# every node's output also appended to LOGDIR/<node>.log.
#
#   GDRIVE_PATH=/data/swarm EXPERIMENT_NAME=gpt2-2x2 MODEL_NAME=openai-community/gpt2 \
#   scripts/tmux-swarm.sh -n 4            # then: tmux attach -t sapod
#
# Every sapod variable set in this shell (see `sapod --help`) is passed to the nodes.
set -euo pipefail

usage() { echo "usage: $0 [-n WORKERS] [-s SESSION] [-l LOGDIR] [-p NODE_PREFIX]" >&2; exit 2; }
workers=2 session=sapod logdir=./sapod-logs prefix=""
while getopts "n:s:l:p:h" opt; do
    case "$opt" in
        n) workers=$OPTARG ;; s) session=$OPTARG ;; l) logdir=$OPTARG ;; p) prefix=$OPTARG ;; *) usage ;;
    esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "$0: -n must be a positive integer" >&2; exit 2; }
: "${GDRIVE_PATH:?set GDRIVE_PATH to the shared folder}"
command -v tmux >/dev/null || { echo "$0: tmux is not installed" >&2; exit 3; }
command -v sapod >/dev/null || { echo "$0: sapod is not on PATH (activate its virtualenv)" >&2; exit 3; }
if tmux has-session -t "$session" 2>/dev/null; then
    echo "$0: tmux session '$session' exists; stop it (tmux kill-session -t $session) or pass -s" >&2
    exit 2
fi

mkdir -p "$logdir"
logdir=$(cd "$logdir" && pwd)
# A running tmux server keeps its own environment, so hand the nodes ours explicitly.
envfile="$logdir/.env.sh"
# sapod's variables, from the Python that runs sapod: the one beside it in a virtualenv, else the
# one its #! line names (pip --user, /usr/local/bin, pipx), else python3.
sapod_bin=$(command -v sapod)
list_vars='from sapod.config import OPTIONS; print(" ".join(o.env for o in OPTIONS))'
shebang=$(sed -n '1s/^#![[:space:]]*//p' "$sapod_bin")
sapod_vars=$("$(dirname "$sapod_bin")/python" -c "$list_vars" 2>/dev/null || $shebang -c "$list_vars" 2>/dev/null ||
             python3 -c "$list_vars" 2>/dev/null) ||
    { echo "$0: cannot find the Python that runs $sapod_bin" >&2; exit 3; }
{
    echo "export PATH=$(printf %q "$PATH")"
    for var in $sapod_vars HF_HOME HF_HUB_OFFLINE CUDA_VISIBLE_DEVICES PYTORCH_CUDA_ALLOC_CONF; do
        [ -n "${!var+x}" ] && echo "export $var=$(printf %q "${!var}")"
    done
} > "$envfile"

node_cmd() {  # role node_id; tee -i: a Ctrl-C in the pane is for sapod, tee keeps its last lines
    printf 'cd %q && . %q && sapod --role %s --node-id %q 2>&1 | tee -ai %q; echo "[%s exited: ${PIPESTATUS[0]}]"; read -r' \
        "$PWD" "$envfile" "$1" "$2" "$logdir/$2.log" "$2"
}

tmux new-session -d -s "$session" -n coordinator "bash -c $(printf %q "$(node_cmd coordinator "${prefix}coordinator")")"
for i in $(seq 1 "$workers"); do
    node="${prefix}w$i"
    tmux new-window -t "$session" -n "$node" "bash -c $(printf %q "$(node_cmd worker "$node")")"
done
echo "started $workers workers and a coordinator in tmux session '$session'"
echo "  attach: tmux attach -t $session     logs: $logdir/<node>.log"
echo "  status: sapod status --shared $GDRIVE_PATH"
