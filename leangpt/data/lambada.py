"""shakespeare-lambada: a LAMBADA-style zero-shot task built from a prepared dataset's val split.

Each passage ends just before a word that the model must predict from the passage: a word of at least four
letters, not one of the split's 100 most frequent words (at most a tenth of its distinct words), that already
appears in the passage (as most of LAMBADA's targets do: they are guessable from the whole passage, not from
the last sentence). A passage is the first one after each of N evenly spaced points of the split's text, so
passages are fixed by the dataset alone (no random draw) and, at the default count, do not overlap. The task is
written as lm-eval task YAML plus JSONL, scored as LAMBADA is: accuracy (the word is the greedy continuation)
and the perplexity of the word.

No torch here: building the task needs the tokenizer and the token shards only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError

TASK = "shakespeare-lambada"
PASSAGES = 500  # about 35 s for the pipeline's four variants on its 2-core CPU (README)
CONTEXT_CHARS = 500  # about 120-150 tokens of Shakespeare at an 8k vocabulary
COMMON_WORDS = 100

_WORD = re.compile(r"[A-Za-z]+")


def _documents(data_dir: Path) -> list[str]:
    """The val split's documents as text (the split holds them separated by the end-of-document token)."""
    tokenizer = TextTokenizer.load(data_dir)
    tokens = np.asarray(Dataset(data_dir).tokens("val"))
    pieces = np.split(tokens, np.flatnonzero(tokens == tokenizer.eos_id))
    return [text for text in (tokenizer.decode(p[p != tokenizer.eos_id].tolist()) for p in pieces) if text]


def _context_before(text: str, end: int, context_chars: int) -> str:
    """The text before `end`, from the first line start (else word start) within context_chars of it."""
    lo = end - context_chars
    newline = text.find("\n", lo, end)
    begin = newline + 1 if newline >= 0 else text.find(" ", lo, end) + 1
    return text[begin:end]


def _is_target(doc: str, m: re.Match, common: set[str]) -> bool:
    """A word of 4+ letters after a space, whole (no apostrophe after it: "ha't"), not in capitals (headings,
    speakers' names) and not a common word, inside a line of text: a speaker's name opening a line is no
    target (the text before it on its line is blank)."""
    word, start = m.group(), m.start()
    if len(word) < 4 or word.isupper() or word.lower() in common or doc[start - 1:start] != " ":
        return False
    if doc[m.end():m.end() + 1] == "'":
        return False
    return bool(doc[doc.rfind("\n", 0, start) + 1:start].strip())


def _passage_at(doc: str, pos: int, context_chars: int, common: set[str]) -> tuple[dict[str, str], int] | None:
    """The first passage of a document from character `pos` on whose target word appears in its context, and
    where its target ends."""
    for m in _WORD.finditer(doc, max(pos, context_chars + 1)):
        if not _is_target(doc, m, common):
            continue
        context = _context_before(doc, m.start() - 1, context_chars)  # stops before the word's space
        if len(context) >= context_chars // 2 and m.group() in context and m.group() in _WORD.findall(context):
            return {"context": context, "target": " " + m.group()}, m.end()
    return None


def lambada_passages(data_dir: str | Path, passages: int = PASSAGES, context_chars: int = CONTEXT_CHARS,
                     common_words: int = COMMON_WORDS) -> list[dict[str, str]]:
    """The task's documents, {"context", "target"} with the target a space and the word: the first passage
    after each of `passages` evenly spaced points of the split's text (and after the one before), in order."""
    if passages < 1:
        raise UserError(f"the number of passages must be >= 1, got {passages}")
    docs = _documents(Path(data_dir))
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(_WORD.findall(doc.lower()))
    # At most a tenth of the distinct words, so that a corpus of few words keeps targets.
    common = {w for w, _ in counts.most_common(min(common_words, len(counts) // 10))}
    total = sum(map(len, docs))
    found: list[dict[str, str]] = []
    d, pos, offset = 0, 0, 0  # the search goes on from character pos of docs[d], which starts at offset
    for i in range(passages):
        point = i * total // passages
        while d < len(docs) and offset + len(docs[d]) <= point:
            d, pos, offset = d + 1, 0, offset + len(docs[d])
        pos = max(pos, point - offset)
        while d < len(docs) and (hit := _passage_at(docs[d], pos, context_chars, common)) is None:
            d, pos, offset = d + 1, 0, offset + len(docs[d])
        if d == len(docs):
            raise UserError(f"{data_dir}: the val split gives {len(found)} passages for {TASK}, fewer than the "
                            f"{passages} asked for")
        passage, pos = hit
        found.append(passage)
    return found


def task_config(data_file: Path, passages: int) -> dict:
    """lm-eval's task YAML for the JSONL at data_file: LAMBADA's metrics on a local file."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "passages": passages},
    }


def write_lambada_task(data_dir: str | Path, out_dir: str | Path, passages: int = PASSAGES,
                       context_chars: int = CONTEXT_CHARS, common_words: int = COMMON_WORDS) -> Path:
    """Write shakespeare-lambada.jsonl and shakespeare-lambada.yaml into out_dir (a directory to give lm-eval
    as an include path); returns the YAML's path. The same dataset always gives the same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = lambada_passages(data_dir, passages, context_chars, common_words)
    data_file = out_dir / f"{TASK}.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                         encoding="utf-8")
    config_file = out_dir / f"{TASK}.yaml"
    config_file.write_text(yaml.safe_dump(task_config(data_file, passages), sort_keys=False))
    return config_file
