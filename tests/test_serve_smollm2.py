"""`lmlab serve` on a real model (SmolLM2-135M-Instruct, at fp32 so that offline runs compare at the
same precision): greedy output equals `lmlab generate`'s alone and inside a batch of 16, chat through
the official client, lm-eval's `local-completions` log-likelihoods equal `lmlab fewshot`'s, and the
chat page in a real headless browser (tests/serve_page.py)."""

import json
import threading

import pytest
import torch
from lm_eval_tasks import harness_task
from peers import require_module, smollm2_gguf
from serve_server import KEY, serve

from lmlab.generate.engine import SamplingConfig, generate_ids, prompt_ids
from lmlab.io.load import load_model

openai = require_module("openai")
GGUF = smollm2_gguf()
NAME = GGUF.name
MARGIN = 1e-3  # the rule: compare up to the first step whose offline top-2 logit margin is below this


@pytest.fixture(scope="module")
def server():
    with serve(GGUF, "--precision", "fp32", "--max-batch", "16", "--max-len", "512", threads=2) as s:
        yield s


@pytest.fixture(scope="module")
def offline():
    return load_model(GGUF, precision="fp32")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def _reference(loaded, text: str, n: int) -> tuple[list[int], list[float]]:
    """`lmlab generate`'s greedy tokens (EOS dropped: the API does not return it) and, per step, the
    top-2 logit margin of one full forward over prompt + tokens."""
    ids = prompt_ids(loaded.tokenizer, text, loaded.bos)
    toks = list(generate_ids(loaded.model, ids, SamplingConfig(max_new_tokens=n, temperature=0),
                             eos_id=loaded.tokenizer.eos_id))
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + toks])).logits[0, len(ids) - 1:]
    top2 = logits.topk(2, dim=-1).values
    toks = [t for t in toks if t != loaded.tokenizer.eos_id]
    return toks, (top2[:, 0] - top2[:, 1]).tolist()


def _same_up_to_a_near_tie(got: list[int], want: list[int], margins: list[float]) -> None:
    for t, w in enumerate(want):
        if margins[t] < MARGIN:
            return  # a near tie: float rounding of other kernels may pick the other token from here on
        assert t < len(got) and got[t] == w, (t, got, want)
    assert len(got) == len(want)


def _served_ids(server, text: str, n: int) -> list[int]:
    r = server.post("/v1/completions", {"model": NAME, "prompt": text, "max_tokens": n, "temperature": 0,
                                        "logprobs": 0, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at",
           "In 1969, the first", "The best way to learn a language is", "Photosynthesis", "Hello, my name is",
           "A list of prime numbers: 2, 3, 5,", "The recipe calls for", "import numpy as np\n",
           "Q: What is 7 times 8?\nA:", "The moon", "Dear Sir,", "Rain in Spain", "Machine learning is"]


def _greedy_under_the_forward(loaded, text: str, got: list[int], n: int) -> None:
    """`got` is what greedy decoding of `text` gives offline: one full forward over prompt + got has its
    argmax at every step (by induction, the offline greedy tokens) up to the first near tie; a reply
    shorter than `n` ended on EOS, which must then be the argmax."""
    ids = prompt_ids(loaded.tokenizer, text, loaded.bos)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:]
    top2 = logits.topk(2, dim=-1)
    want = top2.indices[:, 0].tolist()
    if len(got) < n:
        got = got + [loaded.tokenizer.eos_id]
    _same_up_to_a_near_tie(got, want[:len(got)], (top2.values[:, 0] - top2.values[:, 1]).tolist())


def test_greedy_alone_and_in_a_batch_of_16_equals_lmlab_generate(server, offline):
    jobs = [(p, 3 + (5 * i) % 12) for i, p in enumerate(PROMPTS)]  # 16 requests: 3..14 tokens, prompts of 2..12
    want, margins = _reference(offline, "Once upon a time", 16)  # `lmlab generate`'s own loop, alone
    _same_up_to_a_near_tie(_served_ids(server, "Once upon a time", 16), want, margins)
    got = [None] * len(jobs)

    def one(i):
        got[i] = _served_ids(server, *jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, (p, n) in zip(got, jobs):
        _greedy_under_the_forward(offline, p, g, n)


def test_chat_through_the_official_client(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    text = out.choices[0].message.content
    assert "Paris" in text and out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    lp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                        top_logprobs=2)
    first = lp.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.logprob == pytest.approx(first.top_logprobs[0].logprob)


COLORS = ["red", "green", "blue", "yellow", "black", "white"]


def test_lm_eval_local_completions_equal_lmlab_fewshot(server, tmp_path, monkeypatch):
    lm_eval = require_module("lm_eval")

    from lmlab.eval.harness.fewshot import evaluate_task
    from lmlab.eval.harness.lm import load_lm
    from lmlab.eval.tasks.jsonl import load_jsonl_task

    rows = []
    for i, word in enumerate(["apple", "sky", "grass", "snow", "coal", "sun", "lemon", "night"]):
        rows.append({"context": f"The colour of {word} is", "choices": [COLORS[(i + j) % 6] for j in range(3)],
                     "gold": i % 3, "split": "train" if i < 2 else "test"})
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ours = evaluate_task(load_lm(GGUF), load_jsonl_task(tmp_path / "colours.jsonl"), 0, seed=0)  # `lmlab fewshot`
    manager = harness_task(tmp_path, "lmlab_serve_colours", ours.items)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["lmlab_serve_colours"], num_fewshot=0, log_samples=True,
        bootstrap_iters=0, task_manager=manager,
        model_args={"base_url": server.base_url + "/completions", "model": NAME, "tokenizer_backend": "remote",
                    "num_concurrent": 4, "max_retries": 1, "auth_token": KEY})
    samples = sorted(out["samples"]["lmlab_serve_colours"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert len(theirs) == ours.n
    for a, it in zip(theirs, ours.items):
        assert a == pytest.approx(it["loglikelihoods"], abs=1e-4)


def test_chat_page_in_a_headless_browser(server, tmp_path):
    """The page at / sends two turns; both replies stream in (several partial texts seen before the end)."""
    import os
    import shutil

    from peers import require_binary

    webdriver = require_module("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts = webdriver.ChromeOptions()
    opts.binary_location = require_binary("chromium")
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,700",
                f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(require_binary("chromedriver")), options=opts)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY + Keys.TAB)  # change event: the page loads the model list
        for field, value in [("temperature", "0"), ("max_tokens", "40")]:
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        _wait(lambda: NAME in driver.find_element(By.ID, "model").text, 20)
        replies = []
        for turn in ["What is the capital of France?", "And what is the capital of Germany?"]:
            driver.find_element(By.ID, "input").send_keys(turn + Keys.ENTER)
            seen: set[str] = set()

            def finished(n=len(replies) + 1, seen=seen):  # noqa: B008 (bound now, on purpose)
                bubbles = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")
                if len(bubbles) < n:
                    return False
                seen.add(bubbles[n - 1].text)
                return bubbles[n - 1].get_attribute("data-done") == "1"

            _wait(finished, 120, every=0.02)
            bubbles = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            assert len(bubbles) == len(replies) + 1
            replies.append(bubbles[-1].text)
            assert len({s for s in seen if s}) > 2, seen  # it streamed: partial texts before the whole one
        assert "Paris" in replies[0] and "Berlin" in replies[1]
        driver.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("LMLAB_WRITE_SCREENSHOT"):  # refresh docs/serve/chat.png
            shutil.copy(tmp_path / "chat.png", os.environ["LMLAB_WRITE_SCREENSHOT"])
    finally:
        driver.quit()


def _wait(cond, timeout: float, every: float = 0.1) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
