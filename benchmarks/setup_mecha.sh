#!/usr/bin/env bash
# Build benchmarks/.venv-mecha: sd-mecha 1.1.8 (the reference we race) plus this
# project's own runtime deps, in an environment of its own so that sd-mecha's
# requirements never touch the project's dev venv.  torch is pinned through a
# constraints file: any unpinned resolve would pull GBs of CUDA wheels.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-mecha"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, alone, so the resolver settles on the pinned build (the machine's
# pip.conf find-links provides the CPU wheel here).
"$venv/bin/python" -m pip install -c "$constraints" "torch==2.13.0"
"$venv/bin/python" -m pip install -c "$constraints" "sd-mecha==1.1.8" safetensors numpy tqdm psutil
# py-spy: sampling profiler for benchmarks/profile_ours.py --py-spy (optional, all threads and native frames)
"$venv/bin/python" -m pip install -c "$constraints" "py-spy" || echo "py-spy not installed (optional)"
"$venv/bin/python" - <<'PY'
import torch, sd_mecha, importlib.metadata as md
print("torch", torch.__version__, "| sd-mecha", md.version("sd-mecha"))
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
PY
echo "ready: $venv"
