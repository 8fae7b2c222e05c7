# Sourced by demo.sh and test.sh: make (once) and enter the project's virtualenv.
# SAPOD_VENV picks the folder (default .venv); TORCH_SPEC the torch to install
# (default torch==2.13.0; on a CUDA box use e.g. TORCH_SPEC=torch to get a CUDA build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SAPOD_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.sapod-installed" ] || [ "$here/pyproject.toml" -nt "$venv/.sapod-installed" ]; then
    echo "setting up $venv (torch, sapod and its test extra)..." >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    "$venv/bin/python" -m pip install --quiet -e "$here[test]"
    touch "$venv/.sapod-installed"
fi
export PATH="$venv/bin:$PATH"
cd "$here"
