"""A `tiktoken` encoder equivalent to a GPT-2-style byte-level BPE `tokenizers.Tokenizer`, for bulk encoding.

`tiktoken` encodes the same byte-level BPE about 3x faster than `tokenizers` (bench/bench_prepare.py measures both),
which makes it the tokenization stage of `prepare`. It applies the merge of lowest rank among adjacent pieces, with a
token's id as its rank, so it reproduces `tokenizers` when the model is plain byte-level BPE: GPT-2's split regex on
unnormalised text, all 256 bytes in the vocabulary, and token ids rising with merge order.
`fast_encoder` checks exactly that and returns None otherwise (callers then use `tokenizers`); tests compare both
encoders on varied text. Added tokens (e.g. <|endoftext|>) written out inside a text are split out by `tokenizers`
and not by `tiktoken`, so `TextTokenizer.encode_batch` sends such texts to `tokenizers`.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer

# The split regex of GPT-2, which `tokenizers`' ByteLevel pre-tokenizer applies when use_regex is on.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, printable character -> byte (the inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_plain_byte_level(spec: dict) -> bool:
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and model.get("type") == "BPE"
            and model.get("dropout") is None and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and not model.get("byte_fallback", False)
            and not model.get("ignore_merges", False))


def fast_encoder(tk: Tokenizer):
    """A `tiktoken.Encoding` that gives the ids `tk` gives (added tokens aside), or None when tk is not plain
    byte-level BPE or `tiktoken` is not installed."""
    spec = json.loads(tk.to_str())
    if not _is_plain_byte_level(spec):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    byte_of = byte_decoder()
    vocab = spec["model"]["vocab"]
    # tiktoken's rank is the id: merge order must be id order. Single bytes are never merged into, so their ids
    # need no order; vocabulary entries that no merge produces (e.g. a special token listed in vocab.json) are
    # unreachable by BPE, so they are left out.
    merged = [m.replace(" ", "", 1) if isinstance(m, str) else "".join(m) for m in spec["model"]["merges"]]
    ids = [vocab.get(t) for t in merged]
    singles = {t: i for t, i in vocab.items() if len(t) == 1 and t in byte_of and t not in added}
    if (len(singles) != 256 or any(i is None for i in ids) or any(a >= b for a, b in zip(ids, ids[1:]))
            or not all(c in byte_of for t in merged for c in t)):
        return None
    ranks = {bytes(byte_of[c] for c in t): i for t, i in [*singles.items(), *zip(merged, ids)]}
    return tiktoken.Encoding("leangpt-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
