"""A GGUF file's tokenizer, rebuilt from its `tokenizer.ggml.*` metadata as a Hugging Face `tokenizers`
object inside lmlab's `BPETokenizer`.

Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported: the tokens are stored already
spelled in GPT-2's byte-to-unicode alphabet, merges as "left right" strings in rank order. How text
is split before BPE is not stored; llama.cpp names it in `tokenizer.ggml.pre` and hard-codes the
regex per name (llama-vocab.cpp), so `_PRE_TOKENIZERS` below does the same for the names we know.
Token types (llama.cpp `llama_token_type`): 3 = control (special, e.g. <|im_start|>), 4 =
user-defined (always matched whole, not special).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmlab.errors import LmlabError
from lmlab.tokenizers.base import SpecialTokens
from lmlab.tokenizers.bpe import BPETokenizer

CONTROL, USER_DEFINED = 3, 4

# Llama 3's split regex (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# Qwen2's: Llama 3's with every digit its own piece (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2)
_QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM / StarCoder: every digit is its own piece, then GPT-2's split (SmolLM2's tokenizer.json)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def make() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return make


_llama3, _qwen2 = _split_then_bytes(LLAMA3_SPLIT), _split_then_bytes(_QWEN2_SPLIT)


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2, "gpt2": _gpt2, "gpt-2": _gpt2,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2,
    "llama3": _llama3, "llama-v3": _llama3, "llama-bpe": _llama3, "qwen2": _qwen2,
}


def _token(tokens: list[str], meta: dict[str, Any], role: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{role}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def tokenizer_from_gguf(meta: dict[str, Any]) -> BPETokenizer:
    """`BPETokenizer` from GGUF metadata (as returned by lmlab.io.gguf.read.read_metadata)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmlabError(f"GGUF tokenizer model '{kind}' is not supported (supported: gpt2, byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise LmlabError(f"GGUF pre-tokenizer '{pre}' is not known to lmlab (known: {', '.join(_PRE_TOKENIZERS)})")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    # already in the vocabulary, so adding them keeps their ids and only makes them match whole
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    roles = {r: _token(tokens, meta, key) for r, key in
             (("pad", "padding"), ("unk", "unknown"), ("bos", "bos"), ("eos", "eos"))}
    defaults = SpecialTokens()
    specials = SpecialTokens(**{r: v if v is not None else getattr(defaults, r) for r, v in roles.items()})
    tok = BPETokenizer(hf, specials)
    tok.chat_template = meta.get("tokenizer.chat_template")
    tok.gguf_pre = pre  # written back unchanged on export (lmlab/io/gguf/write.py)
    return tok
