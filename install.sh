#!/usr/bin/env bash
# Installs omni-train and its dependencies into the current Python environment.
# torch comes first and alone: `pip install torch==2.13.0` takes the CPU build on a CPU-only machine;
# everything after is constrained to it, so no CUDA wheels are ever pulled in.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -e ".[test]"
