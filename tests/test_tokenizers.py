import json

import pytest
from peers import require_module

from lmlab.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer, train_tokenizer
from lmlab.tokenizers.base import ROLES

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n"
MIXED = "déjà vu — naïve café 東京 🙂 tabs\tand  spaces\n"


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_specials_are_explicit_and_first(kind, tmp_path):
    tok = train_tokenizer(kind, [TEXT * 20], vocab_size=300)
    ids = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id]
    assert ids == [0, 1, 2, 3, 4]
    assert [tok.specials.as_dict()[r] for r in ROLES] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_lossless_round_trip_through_save_and_load(kind, tmp_path):
    tok = train_tokenizer(kind, [TEXT * 20, MIXED * 5], vocab_size=400)
    tok.save(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    for text in (TEXT, MIXED):
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert again.decode(ids) == text


def test_bpe_handles_unseen_characters_without_unk(tmp_path):
    tok = BPETokenizer.train([TEXT * 50], vocab_size=300)
    text = "Ωmega ∑ 🙂"  # never seen in training: byte-level BPE falls back to bytes
    assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(text)


def test_bpe_treats_special_strings_in_text_as_text():
    tok = BPETokenizer.train([TEXT * 50], vocab_size=300)
    assert tok.eos_id not in tok.encode("a literal </s> in a docstring")


def test_bpe_directory_loads_in_transformers_format(tmp_path):
    tok = BPETokenizer.train([TEXT * 50], vocab_size=300)
    tok.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "</s>" and cfg["mask_token"] == "<mask>"
    transformers = require_module("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.eos_id
    assert hf.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)


def test_char_unknown_maps_to_unk():
    tok = CharTokenizer.train(["abcabc"])
    assert tok.encode("abz") == [tok.stoi["a"], tok.stoi["b"], tok.unk_id]


def test_word_tokenizer_min_count_max_vocab_and_eos_per_line(tmp_path):
    text = "a a a b b c\nb a d\n"
    tok = WordTokenizer.train([text], min_count=2)
    assert tok.itos[5:] == ["a", "b"]  # frequency order; c and d are rare -> <unk>
    ids = tok.encode("a c\nb\n")
    assert ids == [5, tok.unk_id, tok.eos_id, 6, tok.eos_id]
    assert tok.decode(ids) == "a <unk>\nb\n"
    capped = WordTokenizer.train([text], max_vocab=6)
    assert capped.vocab_size == 6 and capped.itos[5] == "a"
    tok.save(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert isinstance(again, WordTokenizer) and again.encode("a c\nb\n") == ids


def test_word_round_trip_on_normalised_text():
    text = "the cat sat\non the mat\n"
    tok = WordTokenizer.train([text])
    assert tok.decode(tok.encode(text)) == text


def test_load_missing_tokenizer_is_clear_error(tmp_path):
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="no tokenizer"):
        load_tokenizer(tmp_path)
