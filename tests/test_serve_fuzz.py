"""Schema fuzzing of `lmlab serve` (schemathesis against the server's own OpenAPI document, on a real
server process on loopback): valid and malformed bodies for every operation, no answer a 5xx."""

import pytest
from peers import require_module
from serve_server import KEY, serve, train_tiny

schemathesis = require_module("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402 (hypothesis comes with schemathesis)
from schemathesis.checks import not_a_server_error  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_schema(bpe_data, tmp_path_factory):
    run = train_tiny(tmp_path_factory.mktemp("fuzz") / "run", bpe_data, "--model.n_layer=1", "--model.n_embd=16",
                     "--model.block_size=64", "--train.max_steps=1")
    # a small queue and batch: fuzzed n / prompt lists meet the limits; a short context bounds each request
    with serve(run, "--max-batch", "4", "--max-queue", "16", "--max-body", "65536") as s:
        yield schemathesis.openapi.from_url(s.url + "/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_is_a_server_error(case):
    """Each operation: 25 examples, schema-valid and not (derandomized: the same examples every run).
    A body's `model` is the served one (a client knows it), so fuzzed requests reach generation rather
    than stopping at 404; unknown models are in tests/test_serve.py's bad-input suite."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "run"
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)
