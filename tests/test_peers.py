"""The policy for missing test peers (tests/peers.py), on peers that do not exist: without
$LMLAB_REQUIRE_PEERS each one skips with how to install it; with it, each one fails naming the peer."""

import pytest

CONFTEST = """
import pytest
from peers import check_marks

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    check_marks(item)
"""

IN_TESTS = """
from peers import needs, require_binary, require_module

def test_module():
    require_module("lmlab_no_such_peer")

def test_binary():
    require_binary("lmlab-no-such-program")

def test_kenlm_bin_names_the_folder():
    require_binary("lmplz")

@needs("lmlab_no_such_peer")
def test_mark():
    pass

def test_present_peers_pass():
    require_module("json")
"""

AT_MODULE_LEVEL = """
from peers import require_module

require_module("lmlab_no_such_peer")

def test_never_runs():
    pass
"""


@pytest.fixture
def run(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers = peers: the test's peers\n")
    monkeypatch.setenv("KENLM_BIN", str(pytester.path / "no-kenlm-here"))

    def run(source: str, strict: bool) -> pytest.RunResult:
        if strict:
            monkeypatch.setenv("LMLAB_REQUIRE_PEERS", "1")
        else:
            monkeypatch.delenv("LMLAB_REQUIRE_PEERS", raising=False)
        pytester.makepyfile(test_it=source)
        return pytester.runpytest("-rs")

    return run


def test_a_missing_peer_skips_and_says_how_to_install_it(run):
    result = run(IN_TESTS, strict=False)
    result.assert_outcomes(passed=1, skipped=4)
    out = result.stdout.str()
    assert "missing test peer 'lmlab_no_such_peer'" in out and "bash .ci/setup-tests.sh" in out
    assert "missing test peer 'lmlab-no-such-program': no executable 'lmlab-no-such-program' in $PATH" in out
    assert "missing test peer 'lmplz'" in out and "no-kenlm-here" in out and "bash .ci/build_kenlm.sh" in out
    assert out.count("SKIPPED [1] test_it.py:") == 4  # each skip at its test, not in tests/peers.py
    result = run(AT_MODULE_LEVEL, strict=False)
    result.assert_outcomes(skipped=1)


def test_under_lmlab_require_peers_a_missing_peer_fails(run):
    result = run(IN_TESTS, strict=True)
    result.assert_outcomes(passed=1, failed=3, errors=1)  # the mark fails the test's setup
    out = result.stdout.str()
    assert "LMLAB_REQUIRE_PEERS is set, so a missing peer is a failure" in out
    for peer in ("lmlab_no_such_peer", "lmlab-no-such-program", "lmplz"):
        assert f"missing test peer '{peer}'" in out
    result = run(AT_MODULE_LEVEL, strict=True)
    assert result.ret != 0
    result.assert_outcomes(errors=1)
    assert "missing test peer 'lmlab_no_such_peer'" in result.stdout.str()
