#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install dinoseg into it.
#   scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test
# Idempotent: a stamp of pyproject.toml and the extras skips the work when nothing changed.
# PyTorch comes first and on its own: with an NVIDIA GPU the default (CUDA) wheel, without one the
# CPU wheel, so a CPU machine does not download several GB of CUDA libraries.
#   DINOSEG_VENV         where the environment lives (default: .venv in the repository)
#   DINOSEG_TORCH_INDEX  an extra package index for torch (default: PyTorch's CPU index when there is
#                        no GPU and that index is reachable; otherwise the configured indexes decide)
#   DINOSEG_TORCH_SPEC   the torch requirement (default: torch==2.13.0)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DINOSEG_VENV:-$root/.venv}
extras=${1:-}
python=${PYTHON:-python3}
torch_spec=${DINOSEG_TORCH_SPEC:-torch==2.13.0}

# one stamp per set of extras; installing with extras also satisfies the plain install
stamp_of() { { cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "extras=$1 torch=$torch_spec"; } | sha256sum | cut -c1-16; }
stamp_file() { echo "$venv/.dinoseg-stamp${1:+-$1}"; }
want=$(stamp_of "$extras")
if [ -f "$(stamp_file "$extras")" ] && [ "$(cat "$(stamp_file "$extras")")" = "$want" ]; then
    exit 0
fi

say() { echo "bootstrap: $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# some machines' pip configs name index folders that do not exist; pip warns once per package
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
export PIP_PROGRESS_BAR=off

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
index_reachable() {  # a quick DNS + TCP check, so an offline machine does not wait on pip's retries
    "$venv/bin/python" - "$1" <<'PY'
import socket, sys, urllib.parse
host = urllib.parse.urlparse(sys.argv[1]).hostname
try:
    socket.create_connection((host, 443), timeout=3).close()
except OSError:
    sys.exit(1)
PY
}

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    args=("$torch_spec")
    if [ -n "${DINOSEG_TORCH_INDEX:-}" ]; then
        args+=(--extra-index-url "$DINOSEG_TORCH_INDEX")
    elif has_gpu; then
        say "NVIDIA GPU found: installing the CUDA build of $torch_spec"
    else
        cpu_index=https://download.pytorch.org/whl/cpu
        if index_reachable "$cpu_index"; then
            args+=(--extra-index-url "$cpu_index")
        fi
        say "no GPU found: installing the CPU build of $torch_spec"
    fi
    quiet_pip install -q "${args[@]}"
fi

target="$root"
[ -n "$extras" ] && target="$root[$extras]"
say "installing dinoseg${extras:+[$extras]} and its dependencies"
quiet_pip install -q -e "$target"
if [[ ",$extras," == *",test,"* ]]; then
    # CLIP's reference tokenizer and vocabulary, which the tokenizer tests compare against: only
    # its tokenizer file is read, so not its dependencies (torchvision would pull another torch)
    quiet_pip install -q --no-deps "open_clip_torch==3.3.0"
fi
echo "$want" > "$(stamp_file "$extras")"
stamp_of "" > "$(stamp_file "")"
