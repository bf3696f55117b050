#!/usr/bin/env bash
# Installs omni-train and its dependencies into the current Python environment.
# torch comes first and alone; everything after is constrained to it (constraints.txt), so nothing pulls in
# another torch. On this project's machines `pip install torch==2.13.0` finds the CPU build on the local
# package index. From stock PyPI that command takes the CUDA build (several GB): a CPU-only user gets the
# CPU wheel with PyTorch's own index, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -e ".[test]"
