#!/usr/bin/env bash
# Builds and checks the `tch` feature (Burn's LibTorch backend), which CI does not build: installing
# PyTorch takes longer than its budget. Needs PyPI; run from anywhere in the repository.
#   1. a virtual environment with torch==2.9.0 (the version burn-tch 0.21 links to) and, for the
#      PyTorch side of the timings, diffusers and peft;
#   2. a release build with --features tch in target/tch (links to that torch, downloads nothing);
#   3. scripts/gpu-check.sh on --device torch-cpu with small shapes: the parity fixtures in f32, f16
#      and bf16, and the DUO step and UNet timings beside PyTorch, into tch-check.json.
# VENV=DIR picks the environment (default .venv-torch); the script's arguments go to gpu-check.sh
# (e.g. --devices "torch-cpu torch-cuda" --torch-device cuda on a GPU machine, without --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.9.0')" 2> /dev/null; then
  "$VENV/bin/pip" install torch==2.9.0
fi
"$VENV/bin/python" -c "import diffusers, peft" 2> /dev/null || "$VENV/bin/pip" install diffusers peft

PATH="$PWD/$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1 CARGO_TARGET_DIR=target/tch \
  cargo build --release -p duo-bench --features tch

TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ $# -eq 0 ]; then
  set -- --devices torch-cpu --torch-device cpu --quick
fi
scripts/gpu-check.sh --bin target/tch/release --python "$VENV/bin/python" --out tch-check.json "$@"
