import subprocess
import sys

from lmlab.models.eliza.session import Eliza, match, reflect


def test_pattern_matching_captures_runs_and_classes():
    assert match("* my * @family *".split(), "well my own mother hates me".split()) == [
        ["well"], ["own"], ["mother"], ["hates", "me"]]
    assert match("* i am *".split(), "you are".split()) is None
    assert match(["*"], []) == [[]]


def test_reflection_swaps_persons():
    assert reflect("i need my mother".split()) == "you need your mother"
    assert reflect("you hate me".split()) == "I hate you"
    assert reflect("myself and you".split()) == "yourself and I"


def test_a_conversation_reflects_the_user():
    e = Eliza()
    script = [
        ("Hello", "How do you do. Please state your problem."),
        ("I need a holiday.", "What would it mean to you if you got a holiday?"),
        ("I'm sad", "I am sorry to hear that you are sad."),
        ("My mother hates me", "Tell me more about your family."),
        ("My mother hates me", "Who else in your family hates you?"),   # the rule's next reply
        ("You are annoying", "What makes you think I am annoying?"),
        ("Well, my boyfriend made me come here.", "Your boyfriend made you come here?"),
        ("I don't like talking", "Don't you really like talking?"),
        ("Machines are stupid", "Do computers worry you?"),             # PRE: machine -> computer, rank 50
        ("hmm", "Earlier you mentioned your mother hates you."),         # MEMORY of an earlier "my ..."
        ("bye", "Goodbye. Thank you for talking to me."),
    ]
    for said, expected in script:
        assert e.respond(said) == expected, said


def test_generic_replies_when_nothing_matches():
    e = Eliza()
    assert [e.respond("hmm") for _ in range(2)] == ["Please go on.", "I'm not sure I understand you fully."]


def test_seed_makes_it_deterministic():
    said = ["I am sad", "I am sad", "My dad shouts", "I want cake", "whatever"]
    a, b, c = Eliza(seed=7), Eliza(seed=7), Eliza(seed=8)
    ra, rb = [a.respond(s) for s in said], [b.respond(s) for s in said]
    assert ra == rb
    assert ra[0] != ra[1]  # the rule moved on to its next reply
    assert any(x != y for x, y in zip(ra, [c.respond(s) for s in said]))


def test_cli_chat_with_eliza_reads_stdin():
    r = subprocess.run([sys.executable, "-m", "lmlab", "chat", "--model", "eliza"],
                       input="I need a holiday\nMy father is angry with me\n\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Please tell me your problem." in out
    assert "What would it mean to you if you got a holiday?" in out
    assert "Tell me more about your family." in out
