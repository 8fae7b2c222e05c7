#!/usr/bin/env bash
# Run the demo swarm on the embedded model (sets up .venv on first use).
. "$(dirname "$0")/_venv.sh"
exec sapod demo "$@"
