#!/usr/bin/env bash
# Run the test suite (sets up .venv on first use). Extra arguments go to pytest.
. "$(dirname "$0")/_venv.sh"
exec python -m pytest -q "$@"
