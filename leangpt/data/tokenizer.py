"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained here or loaded from a directory."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from leangpt.data.fastbpe import byte_decoder, fast_encoder
from leangpt.errors import UserError

EOT = "<|endoftext|>"


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the end-of-document token and byte lengths of tokens."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOT) -> None:
        self.tk = tokenizer
        self.eos_token = eos_token
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"tokenizer has no end-of-document token {eos_token!r}")
        self.eos_id: int = eos_id

    # ------------------------------------------------------------ building and loading
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "TextTokenizer":
        if vocab_size < 257:
            raise UserError(f"vocab size must be at least 257 (256 bytes + end-of-document), got {vocab_size}")
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """From a dataset dir, checkpoint dir or Hugging Face tokenizer dir (tokenizer.json, or vocab.json + merges.txt)."""
        path = Path(path)
        eos = EOT
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                eos_cfg = json.loads(cfg_file.read_text()).get("eos_token") or EOT
            except json.JSONDecodeError:
                raise UserError(f"{cfg_file}: not valid JSON") from None
            eos = eos_cfg["content"] if isinstance(eos_cfg, dict) else eos_cfg
        if (path / "tokenizer.json").is_file():
            try:
                tk = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on a malformed file
                raise UserError(f"{path / 'tokenizer.json'}: cannot be read ({str(e).splitlines()[0]})") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tk = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
        else:
            raise UserError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) found")
        return cls(tk, eos)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json plus the files transformers' AutoTokenizer needs."""
        directory = Path(directory)
        self.tk.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token, "bos_token": self.eos_token, "unk_token": self.eos_token,
            "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        special = {"eos_token": self.eos_token, "bos_token": self.eos_token, "unk_token": self.eos_token}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))

    # ------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    @cached_property
    def fast(self):
        """The `tiktoken` equivalent of this tokenizer (see leangpt.data.fastbpe), or None."""
        return fast_encoder(self.tk)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts, encoded in parallel threads: by `tiktoken` where it is equivalent (about 3x faster),
        else by `tokenizers`' fast variant (no offsets)."""
        if self.fast is None:
            return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]
        added = [t.content for t in self.tk.get_added_tokens_decoder().values()]
        out = self.fast.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        for i, text in enumerate(texts):
            if any(a in text for a in added):  # `tokenizers` splits written-out added tokens off first
                out[i] = self.encode(text)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of every token id (0 for special tokens): bits per byte need it."""
        byte_of = byte_decoder()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        for token, i in self.tk.get_vocab().items():
            if token in special or i >= len(lengths):
                continue
            if all(c in byte_of for c in token):
                lengths[i] = len(token)  # byte-level alphabet: one character per byte
            else:
                lengths[i] = len(self.tk.decode([i]).encode("utf-8"))
        return lengths

    def stream_pieces(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces for a stream of ids that never split a UTF-8 character."""
        decoder = StreamDecoder(self)
        for i in ids:
            if piece := decoder.add(i):
                yield piece
        if piece := decoder.finish():
            yield piece


class StreamDecoder:
    """The text of a growing sequence of token ids, handed out in pieces that never split a UTF-8 character.

    A token may carry only some bytes of a character; the text then ends in U+FFFD, and the piece waits for
    the rest. Each step decodes only the tokens since the last piece, with the tokens of that piece as context,
    so a long completion costs linear time and the pieces join to exactly the decoded text.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._context = self._shown = 0  # ids[_context:_shown]: the last piece's tokens; ids[_shown:]: not shown

    def add(self, token: int) -> str:
        """Take one token; return the text that is now complete (may be empty)."""
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The text still held back (an incomplete character shows as U+FFFD), once no more tokens will come."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._shown == len(self.ids):
            return ""
        text = self.tokenizer.decode(self.ids[self._context:])
        if text.endswith("\ufffd") and not final:
            return ""
        shown = self.tokenizer.decode(self.ids[self._context:self._shown])
        self._context, self._shown = self._shown, len(self.ids)
        return text[len(shown):]
