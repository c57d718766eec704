#!/usr/bin/env bash
# Set up ./.venv (pinned CPU torch) and serve the merge tab on http://127.0.0.1:7870.
# With no checkpoints in ./models it writes small synthetic SD1 ones there to try it out.
# Extra arguments go to `python -m lib_merge ui` (e.g. --models-dir /path/to/Stable-diffusion --port 7870).
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/setup-env
mkdir -p models
exec .venv/bin/python -m lib_merge ui --models-dir models --demo "$@"
