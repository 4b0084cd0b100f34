"""`leangpt prepare`: sources → clean → quality filters → exact and near dedup → document-level split →
tokenizer → train.bin / val.bin + manifest.json.

Two passes over the text. Pass 1 streams every source through cleaning, the filters and the hashes (in worker
processes), drops exact duplicates on the fly and spools kept documents to disk; only their names, offsets and
MinHash signatures stay in memory. Between the passes, near-duplicates are clustered (LSH over all signatures),
related documents are grouped so that they land in one split, and the split is drawn. Pass 2 reads the spool back,
trains the tokenizer on a bounded sample, tokenizes in parallel (Rust threads, the next batch while the last one is
written) and appends to the shards. Nothing here imports torch, so the command starts in a fraction of a second.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from leangpt import cli
from leangpt.cli import setting
from leangpt.data.clean import CLEAN_STEPS, clean
from leangpt.data.dedup import MinHasher, exact_key, lsh_params, near_duplicates
from leangpt.data.filters import FILTER_NAMES, FilterSettings, failing_filter
from leangpt.data.shards import token_dtype
from leangpt.data.sources import DEFAULT_INCLUDE, Document, ReadOptions, SourceSpec, SourceStats, read_source
from leangpt.data.tokenizer import TextTokenizer
from leangpt.data.words import words
from leangpt.data.writer import Spool, TokenWriter
from leangpt.errors import UserError
from leangpt.fsutil import atomic_dir, check_output_dir

# Text per worker task and per tokenizer call: small enough that two workers share a 10 MB corpus evenly, large
# enough that a task's overhead (pickling, scheduling) stays under 1%.
BATCH_BYTES = 1 << 20
TOKENIZER_SAMPLE_BYTES = 4 << 20  # default BPE training sample; BENCHMARKS.md has its effect on bytes per token
SPLITS = ("train", "val")  # split_of values 0 and 1; -1 marks a removed document


@dataclasses.dataclass
class PrepareSettings:
    """Every setting of `leangpt prepare`: its flags, and its keys for --config and --set."""

    source: list[str] = setting([], "'shakespeare' (the embedded corpus), a .txt/.md file, a .jsonl or .parquet file, "
                                    "or a directory of them (recursive); repeatable. '@WEIGHT' sets the source's mixing "
                                    "weight: expected copies of each of its documents in the train split (e.g. @0.5, @2)",
                                required=True, metavar="SOURCE[@WEIGHT]")
    out: Path | None = setting(None, "dataset directory to write", required=True)
    vocab_size: int = setting(8192, "BPE vocabulary size, end-of-document token included")
    tokenizer: Path | None = setting(None, "reuse the tokenizer of a dataset, checkpoint or Hugging Face tokenizer "
                                           "directory instead of training one")
    tokenizer_sample_bytes: int = setting(TOKENIZER_SAMPLE_BYTES, "train the tokenizer on at most this many bytes of "
                                          "train documents: whole documents in seeded random order (default 4 MiB; "
                                          "more gives slightly fewer tokens per byte, slower)")
    val_fraction: float = setting(0.1, "fraction of documents held out for validation")
    seed: int = setting(0, "seed of the document split, mixing and tokenizer sample")
    include: list[str] = setting(list(DEFAULT_INCLUDE), "in directories, read files matching this glob (name or "
                                 "relative path); repeatable (default: *.txt *.md *.jsonl *.parquet)", metavar="GLOB")
    exclude: list[str] = setting([], "in directories, skip files matching this glob; repeatable", metavar="GLOB")
    text_field: str = setting("text", "JSONL field / Parquet column that holds the text")
    skip_bad_lines: bool = setting(False, "skip (and count) JSONL lines that are not JSON or lack the text field "
                                          "instead of failing")
    no_clean: list[str] = setting([], f"turn a cleaning step off; repeatable; steps: {', '.join(CLEAN_STEPS)}",
                                  choices=CLEAN_STEPS, metavar="STEP")
    filters_enabled: bool = setting(True, "apply no quality filter", flag="--no-filters")
    no_filter: list[str] = setting([], f"turn one quality filter off; repeatable; filters: {', '.join(FILTER_NAMES)}",
                                   choices=FILTER_NAMES, metavar="NAME")
    filter_set: list[str] = setting([], "set a filter threshold, e.g. min_words=20 or max_top_ngram_char_fraction.2=0.25 "
                                        "(the same as --set filters.min_words=20, "
                                        "--set filters.max_top_ngram_char_fraction.n2=0.25); repeatable",
                                    metavar="KEY=VALUE")
    filters: FilterSettings = setting(FilterSettings(), "quality-filter thresholds and switches")
    exact_dedup: bool = setting(True, "keep documents whose normalised text is identical")
    near_dup_threshold: float = setting(0.8, "MinHash Jaccard (word 5-shingles) at which documents are "
                                             "near-duplicates; one per cluster is kept; 0 turns near-dedup off")
    split_group_threshold: float = setting(0.05, "documents at least this similar (MinHash Jaccard) are kept in the "
                                                 "same split, so that related texts (e.g. two editions of a play) do "
                                                 "not leak from train into val; 0 turns it off")
    num_perm: int = setting(128, "MinHash permutations per document")
    shingle: int = setting(5, "words per MinHash shingle")
    workers: int = setting(os.cpu_count() or 1, "processes for cleaning, filters and hashing (default: one per core; "
                                                "tokenization uses a thread per core)")
    dry_run: bool = setting(False, "print what cleaning, each filter and dedup would remove, and the split; write nothing")
    overwrite: bool = setting(False, "replace an existing output directory")
    progress: bool = setting(False, "show progress bars on stderr (the command does when stderr is a terminal and "
                                    "there is no --json)", cli=False)

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.tokenizer is None and self.tokenizer_sample_bytes < 1:
            raise UserError(f"--tokenizer-sample-bytes must be at least 1, got {self.tokenizer_sample_bytes}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.num_perm < 2 or self.shingle < 1:
            raise UserError(f"--num-perm must be at least 2 and --shingle at least 1, got {self.num_perm} and {self.shingle}")
        for name, thr in (("--near-dup-threshold", self.near_dup_threshold),
                          ("--split-group-threshold", self.split_group_threshold)):
            if not 0.0 <= thr < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {thr}")
            try:
                if thr:
                    lsh_params(thr, self.num_perm)  # the banding that finds pairs just above thr needs enough
            except ValueError as e:
                raise UserError(f"{name} {thr}: {e}; raise --num-perm or the threshold") from None
        self.quality_filters()

    def read_options(self) -> ReadOptions:
        return ReadOptions(tuple(self.include), tuple(self.exclude), self.text_field, self.skip_bad_lines)

    def clean_steps(self) -> dict[str, bool]:
        return {step: step not in self.no_clean for step in CLEAN_STEPS}

    def quality_filters(self) -> FilterSettings | None:
        """The filters to apply (None with --no-filters): `filters` with the --filter-set values set on it and the
        --no-filter ones switched off."""
        if not self.filters_enabled:
            return None
        filters = copy.deepcopy(self.filters)
        for item in self.filter_set:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--filter-set expects KEY=VALUE, got {item!r}")
            try:
                cli.apply_overrides(filters, None, [f"{_filter_key(key.strip())}={value}"])
            except UserError as e:
                raise UserError(f"--filter-set: {e}") from None
        for name in self.no_filter:
            setattr(filters.enabled, name, False)
        return filters


def _filter_key(key: str) -> str:
    """--filter-set's key as a key of FilterSettings: a trailing n-gram length N names the field nN."""
    head, _, n = key.rpartition(".")
    return f"{head}.n{n}" if head and n.isdigit() else key


def prepare(s: PrepareSettings, *, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Build the dataset directory s.out (see the module docstring); returns the manifest.

    With s.dry_run nothing is written and no tokenizer is trained. A timings dict, when given, receives each
    stage's wall and CPU seconds (kept out of the manifest, which must not vary from run to run).
    """
    s.validate()
    stages = _Stages({} if timings is None else timings)
    if s.dry_run:
        return _prepare(s, None, stages)
    check_output_dir(s.out, s.overwrite)
    with atomic_dir(s.out) as tmp:
        return _prepare(s, tmp, stages)


def _prepare(s: PrepareSettings, tmp: Path | None, stages: _Stages) -> dict[str, Any]:
    """The steps, top to bottom; tmp is the output's temporary directory (None: a dry run)."""
    specs = [SourceSpec.parse(spec) for spec in s.source]
    filters = s.quality_filters()
    spool = Spool(tmp / "documents.spool") if tmp is not None else None
    try:
        corpus = _first_pass(s, specs, _Config(s.clean_steps(), filters, _hasher(s)), spool)
        stages.lap("read_clean_filter_hash")
        signatures = corpus.take_signatures()
        keep, near = _near_dedup(corpus, signatures, s.near_dup_threshold)
        removed = _removed(corpus)
        kept_idx = np.flatnonzero(keep)
        _check_enough_left(corpus, removed, len(kept_idx))
        groups, related = _split_groups(corpus.names, signatures, kept_idx, s.split_group_threshold)
        del signatures
        split_of = np.full(len(corpus.names), -1, dtype=np.int8)
        split_of[kept_idx] = _split_units(len(kept_idx), groups, s.val_fraction, s.seed).astype(np.int8)
        stages.lap("dedup_split")
        copies = _copies(specs, corpus.source, split_of, s.seed)
        manifest: dict[str, Any] = {
            "sources": [st.to_dict() for st in corpus.source_stats],
            "documents_read": corpus.read["documents"], "bytes_read": corpus.read["bytes"],
            "documents_kept": int(len(kept_idx)), "cleaning": corpus.cleaning, "removed": removed,
            "filters": filters.to_dict() if filters else None,
            "exact_dedup": {"enabled": s.exact_dedup, "clusters": [{"kept": corpus.names[k], "removed": v}
                                                                   for k, v in corpus.exact_clusters.items()]},
            "near_dedup": {**near, "num_perm": s.num_perm, "shingle_words": s.shingle},
            "split": {"seed": s.seed, "val_fraction": s.val_fraction, "group_threshold": s.split_group_threshold or None,
                      "related_pairs": related, "groups": [[corpus.names[kept_idx[i]] for i in g] for g in groups]},
            "mixing": [{"source": spec.path, "weight": spec.weight,
                        "train_documents": int(copies[(split_of == 0) & (np.array(corpus.source) == i)].sum())}
                       for i, spec in enumerate(specs)],
        }
        if spool is None:
            manifest.update(_splits_listed(corpus, split_of, copies))
            return manifest
        spool.close_writing()
        _tokenize(s, spool, corpus.names, split_of, copies, tmp, manifest, stages)
    finally:
        if spool is not None:
            spool.close()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class _Stages:
    """Wall and CPU seconds of each stage into a dict (name, name + "_cpu"). CPU counts this process's threads and
    its finished worker processes (the pass-1 pool is joined before its stage ends)."""

    def __init__(self, out: dict[str, float]) -> None:
        self.out = out
        self._last = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return time.perf_counter(), t.user + t.system + t.children_user + t.children_system

    def lap(self, name: str) -> None:
        now = self._now()
        self.out[name], self.out[name + "_cpu"] = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now


# ---------------------------------------------------------------- pass 1: read, clean, filter, hash

def _hasher(s: PrepareSettings) -> MinHasher | None:
    """Signatures serve near-dedup and split grouping; without either, none are computed."""
    return MinHasher(s.num_perm, s.shingle) if s.near_dup_threshold or s.split_group_threshold else None


@dataclasses.dataclass
class Analysis:
    """What pass 1 needs to know about one document (computed in a worker)."""

    text: str | None  # cleaned, when cleaning changed a kept document (else the caller's text is it: less to pickle)
    bytes_in: int
    nbytes: int  # UTF-8 bytes after cleaning
    cleaned: dict[str, int]  # cleaning step -> bytes it removed
    removed_by: str | None  # "empty" or a filter name
    key: bytes
    signature: np.ndarray | None


@dataclasses.dataclass
class _Config:
    clean_steps: dict[str, bool]
    filters: FilterSettings | None
    hasher: MinHasher | None


_worker_cfg: _Config | None = None


def _init_worker(cfg: _Config) -> None:
    global _worker_cfg
    _worker_cfg = cfg


def analyse(texts: list[str], cfg: _Config | None = None) -> list[Analysis]:
    cfg = cfg or _worker_cfg
    out = []
    for raw in texts:
        text, changed = clean(raw, cfg.clean_steps)
        n_in = len(raw.encode("utf-8"))
        n_out = len(text.encode("utf-8")) if changed else n_in
        if not text.strip():
            out.append(Analysis(None, n_in, n_out, changed, "empty", b"", None))
            continue
        w = words(text) if cfg.filters or cfg.hasher else None
        reason = failing_filter(text, w, cfg.filters) if cfg.filters else None
        if reason:
            out.append(Analysis(None, n_in, n_out, changed, reason, b"", None))
            continue
        sig = cfg.hasher.signature_of_shingles(w.ngrams(cfg.hasher.shingle)) if cfg.hasher else None
        out.append(Analysis(text if changed else None, n_in, n_out, changed, None, exact_key(text), sig))
    return out


def _batches(docs: Iterator[tuple[int, Document]]) -> Iterator[list[tuple[int, Document]]]:
    batch: list[tuple[int, Document]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[1].text)
        if size >= BATCH_BYTES or len(batch) >= 1024:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _analysed(batches: Iterator[list[tuple[int, Document]]], cfg: _Config,
              workers: int) -> Iterator[tuple[int, Document, Analysis]]:
    """(source index, document, analysis) in input order; at most 2 batches per worker in flight."""
    if workers <= 1:
        for batch in batches:
            yield from ((s, d, a) for (s, d), a in zip(batch, analyse([d.text for _, d in batch], cfg)))
        return
    # Children never tokenize; saying so keeps `tokenizers` from warning about forking after parallel use.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(analyse, ([d.text for _, d in batch],))))
            while len(pending) > 2 * workers:
                done, result = pending.popleft()
                yield from ((s, d, a) for (s, d), a in zip(done, result.get()))
        while pending:
            done, result = pending.popleft()
            yield from ((s, d, a) for (s, d), a in zip(done, result.get()))


def _counter() -> dict[str, int]:
    return {"documents": 0, "bytes": 0}


def _count(counter: dict[str, int], nbytes: int) -> None:
    counter["documents"] += 1
    counter["bytes"] += nbytes


@dataclasses.dataclass
class _Corpus:
    """What pass 1 keeps in memory: the counts of each step, and per kept document its name, source index, size
    and MinHash signature (its text is in the spool)."""

    source_stats: list[SourceStats]
    read: dict[str, int] = dataclasses.field(default_factory=_counter)
    cleaning: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {step: _counter() for step in CLEAN_STEPS})
    removed: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {k: _counter() for k in ("empty", *FILTER_NAMES, "exact_dedup", "near_dedup")})
    exact_clusters: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # kept index -> removed names
    names: list[str] = dataclasses.field(default_factory=list)
    source: list[int] = dataclasses.field(default_factory=list)
    nbytes: list[int] = dataclasses.field(default_factory=list)
    signatures: list[np.ndarray] = dataclasses.field(default_factory=list)

    def count_read(self, a: Analysis) -> None:
        _count(self.read, a.bytes_in)
        for step, nbytes in a.cleaned.items():
            _count(self.cleaning[step], nbytes)

    def keep(self, src: int, doc: Document, a: Analysis, spool: Spool | None) -> None:
        if spool is not None:
            spool.append(doc.text if a.text is None else a.text)
        self.names.append(doc.name)
        self.source.append(src)
        self.nbytes.append(a.nbytes)
        if a.signature is not None:
            self.signatures.append(a.signature)

    def take_signatures(self) -> np.ndarray:
        """The (documents, num_perm) signature matrix; the per-document list is let go."""
        matrix = np.stack(self.signatures) if self.signatures else np.zeros((len(self.names), 0), np.uint32)
        self.signatures = []
        return matrix


def _documents(specs: list[SourceSpec], read: ReadOptions, stats: list[SourceStats]) -> Iterator[tuple[int, Document]]:
    for i, (spec, st) in enumerate(zip(specs, stats)):
        for doc in read_source(spec, read, st):
            yield i, doc


def _first_pass(s: PrepareSettings, specs: list[SourceSpec], cfg: _Config, spool: Spool | None) -> _Corpus:
    """Stream every source through cleaning, the filters and the hashes; exact duplicates are dropped on the fly
    (the first copy is kept) and kept documents are spooled."""
    corpus = _Corpus([SourceStats(spec.path, spec.weight) for spec in specs])
    first_of: dict[bytes, int] = {}  # exact-dedup digest -> index of the kept document
    bar = tqdm(total=None, unit="B", unit_scale=True, desc="read, clean, filter, hash", disable=not s.progress)
    try:
        docs = _documents(specs, s.read_options(), corpus.source_stats)
        for src, doc, a in _analysed(_batches(docs), cfg, s.workers):
            bar.update(a.bytes_in)
            corpus.count_read(a)
            if a.removed_by:
                _count(corpus.removed[a.removed_by], a.nbytes)
                continue
            if s.exact_dedup:
                first = first_of.setdefault(a.key, len(corpus.names))
                if first != len(corpus.names):
                    _count(corpus.removed["exact_dedup"], a.nbytes)
                    corpus.exact_clusters.setdefault(first, []).append(doc.name)
                    continue
            corpus.keep(src, doc, a, spool)
    finally:
        bar.close()
    return corpus


# ---------------------------------------------------------------- between the passes: near dedup, the split, mixing

def _near_dedup(corpus: _Corpus, signatures: np.ndarray, threshold: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The mask of documents kept, and the manifest's record of the clusters (the first document of each is kept)."""
    keep = np.ones(len(corpus.names), dtype=bool)
    near: dict[str, Any] = {"threshold": threshold or None, "clusters": []}
    if not threshold or not len(corpus.names):
        return keep, near
    res = near_duplicates(signatures, threshold)
    near.update(bands=res.bands, rows=res.rows)
    for cluster in res.clusters:
        keep[cluster[1:]] = False
        for j in cluster[1:]:
            _count(corpus.removed["near_dedup"], corpus.nbytes[j])
        estimate = {j: e for i, j, e in res.pairs if i == cluster[0]}
        near["clusters"].append({"kept": corpus.names[cluster[0]], "removed": [
            {"name": corpus.names[j], "jaccard_estimate": round(estimate.get(j, 0.0), 4)} for j in cluster[1:]]})
    return keep, near


def _removed(corpus: _Corpus) -> dict[str, dict[str, int]]:
    """Documents and bytes each step removed, in the order of the steps."""
    cleaning = {"documents": corpus.removed["empty"]["documents"],
                "bytes": sum(c["bytes"] for c in corpus.cleaning.values())}
    return {"cleaning": cleaning, **{f: corpus.removed[f] for f in FILTER_NAMES},
            "exact_dedup": corpus.removed["exact_dedup"], "near_dedup": corpus.removed["near_dedup"]}


def _check_enough_left(corpus: _Corpus, removed: dict[str, dict[str, int]], kept: int) -> None:
    n_read = corpus.read["documents"]
    if kept == 0:
        parts = [f"{k} {v['documents']}" for k, v in removed.items() if v["documents"]]
        raise UserError(f"no documents left out of {n_read} read"
                        + (f" (removed by: {', '.join(parts)})" if parts else " (the sources hold no documents)"))
    if kept < 2:
        raise UserError(f"need at least 2 documents to split into train and val by document ({n_read} read, {kept} kept)")


def _split_groups(names: list[str], signatures: np.ndarray, kept_idx: np.ndarray,
                  threshold: float) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Groups of related kept documents (indices into kept_idx), to be kept in one split, and their pairs."""
    if not threshold:
        return [], []
    res = near_duplicates(signatures[kept_idx], threshold)
    related = [{"a": names[kept_idx[i]], "b": names[kept_idx[j]], "jaccard_estimate": round(e, 4)}
               for i, j, e in res.pairs]
    return res.clusters, related


def _split_units(n: int, groups: list[list[int]], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (n,) mask of val documents: whole groups (related documents) go to one split."""
    in_group = np.zeros(n, dtype=bool)
    for g in groups:
        in_group[g] = True
    units = groups + [[i] for i in np.flatnonzero(~in_group).tolist()]
    units.sort(key=lambda u: u[0])
    order = np.random.default_rng(seed).permutation(len(units))
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    is_val = np.zeros(n, dtype=bool)
    taken = 0
    for u in order:
        if taken + len(units[u]) <= n_val:
            is_val[units[u]] = True
            taken += len(units[u])
        if taken == n_val:
            break
    if taken == 0 or taken == n:
        raise UserError(f"cannot split {n} documents into train and val: related documents form groups too large "
                        f"(largest {max(map(len, units))}); lower --split-group-threshold or set it to 0")
    return is_val


def _copies(specs: list[SourceSpec], doc_source: list[int], split_of: np.ndarray, seed: int) -> np.ndarray:
    """Times each document is written. Mixing: a train document of a source with weight w is written floor(w) times,
    plus once more with probability frac(w) (seeded); val documents are written once, so eval measures each source
    as it is; removed documents never."""
    weights = np.array([spec.weight for spec in specs])[np.array(doc_source, dtype=np.int64)]
    u = np.random.default_rng([seed, 1]).random(len(split_of))
    copies = np.where(split_of == 0, np.floor(weights) + (u < weights - np.floor(weights)), 0).astype(np.int64)
    copies[split_of == 1] = 1
    return copies


def _splits_listed(corpus: _Corpus, split_of: np.ndarray, copies: np.ndarray) -> dict[str, dict[str, Any]]:
    """A dry run's record of each split: what pass 2 would write."""
    out = {}
    for flag, split in enumerate(SPLITS):
        idx = np.flatnonzero(split_of == flag)
        out[split] = {"documents": int(copies[idx].sum()), "unique_documents": int(len(idx)),
                      "bytes": int(sum(corpus.nbytes[i] * copies[i] for i in idx)),
                      "names": [corpus.names[i] for i in idx]}
    return out


# ---------------------------------------------------------------- pass 2: tokenizer, shards

def _tokenizer_sample(spool: Spool, train_idx: np.ndarray, budget: int, seed: int,
                      counts: dict[str, int]) -> Iterator[str]:
    """Train documents in seeded random order until budget UTF-8 bytes, the last one cut to fit; counts receives
    the documents and bytes yielded. Whole documents from across the corpus keep its mix of sources and styles."""
    for i in train_idx[np.random.default_rng([seed, 2]).permutation(len(train_idx))].tolist():
        if budget <= 0:
            return
        text = spool[i]
        if spool.nbytes(i) > budget:
            text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
        counts["documents"] += 1
        counts["bytes"] += len(text.encode("utf-8"))
        budget -= spool.nbytes(i)
        yield text


def _tokenizer(s: PrepareSettings, spool: Spool, split_of: np.ndarray,
               manifest: dict[str, Any]) -> TextTokenizer:
    """The reused tokenizer, or one trained on a sample of the train documents; recorded in the manifest."""
    sample: dict[str, int] | None = None
    if s.tokenizer is not None:
        tokenizer = TextTokenizer.load(s.tokenizer)
    else:
        sample = _counter()
        train_idx = np.flatnonzero(split_of == 0)
        tokenizer = TextTokenizer.train(_tokenizer_sample(spool, train_idx, s.tokenizer_sample_bytes, s.seed, sample),
                                        s.vocab_size)
    manifest.update(vocab_size=tokenizer.vocab_size, eos_token=tokenizer.eos_token, eos_token_id=tokenizer.eos_id,
                    tokenizer_sha256=tokenizer.sha256(),
                    tokenizer_source=str(s.tokenizer) if s.tokenizer else "trained",
                    tokenizer_sample_bytes=None if s.tokenizer else s.tokenizer_sample_bytes,
                    tokenizer_sample=sample, dtype=token_dtype(tokenizer.vocab_size).name)
    return tokenizer


def _tokenize(s: PrepareSettings, spool: Spool, names: list[str], split_of: np.ndarray, copies: np.ndarray,
              tmp: Path, manifest: dict[str, Any], stages: _Stages) -> None:
    tokenizer = _tokenizer(s, spool, split_of, manifest)
    stages.lap("tokenizer_training")
    manifest.update(_write_shards(tokenizer, spool, names, split_of, copies, tmp, s.progress))
    tokenizer.save(tmp)
    manifest["tokenizer_encoder"] = "tiktoken" if tokenizer.fast is not None else "tokenizers"
    stages.lap("tokenize_write")


def _spool_batches(spool: Spool, idx: np.ndarray) -> Iterator[list[int]]:
    """Spool indices in order, about BATCH_BYTES of text per batch."""
    batch: list[int] = []
    size = 0
    for i in idx.tolist():
        batch.append(i)
        size += spool.nbytes(i)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_shards(tokenizer: TextTokenizer, spool: Spool, names: list[str], split_of: np.ndarray, copies: np.ndarray,
                  tmp: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Append each document's tokens copies[i] times to its split's shard; returns each split's record."""
    writers = [TokenWriter(tmp / f"{split}.bin", token_dtype(tokenizer.vocab_size), tokenizer.eos_id)
               for split in SPLITS]
    records = [{"documents": 0, "unique_documents": 0, "bytes": 0, "tokens": 0, "names": []} for _ in writers]
    bar = tqdm(total=int((np.array([spool.nbytes(i) for i in range(len(spool))]) * copies).sum()), unit="B",
               unit_scale=True, desc="tokenize", disable=not progress)

    def write(batch: list[int], ids: list[list[int]]) -> None:
        for i, doc_ids in zip(batch, ids):
            split, n = int(split_of[i]), int(copies[i])
            rec = records[split]
            writers[split].write([doc_ids] * n)
            rec["documents"] += n
            rec["unique_documents"] += 1
            rec["bytes"] += spool.nbytes(i) * n
            rec["names"].append(names[i])
            bar.update(spool.nbytes(i) * n)

    # The next batch is encoded (by the tokenizer's own threads) while this one is written.
    with ThreadPoolExecutor(1) as ahead:
        pending = None
        for batch in _spool_batches(spool, np.flatnonzero(copies > 0)):
            job = ahead.submit(lambda b: tokenizer.encode_batch([spool[i] for i in b]), batch)
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = (batch, job)
        if pending is not None:
            write(pending[0], pending[1].result())
    bar.close()
    for w, rec in zip(writers, records):
        w.close()
        rec["tokens"] = w.tokens
    return dict(zip(SPLITS, records))


# ---------------------------------------------------------------- the command

def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    out = {k: manifest[k] for k in ("documents_read", "bytes_read", "documents_kept", "removed")}
    out.update({k: manifest[k] for k in ("vocab_size", "tokenizer_sha256") if k in manifest})
    out.update({s: {k: v for k, v in manifest[s].items() if k != "names"} for s in ("train", "val")})
    out["near_dup_clusters"] = len(manifest["near_dedup"]["clusters"])
    out["related_pairs"] = [(p["a"], p["b"], p["jaccard_estimate"]) for p in manifest["split"]["related_pairs"]]
    return out


def table(manifest: dict[str, Any]) -> str:
    lines = [f"{'step':<22}{'documents':>12}{'bytes':>16}",
             f"{'read':<22}{manifest['documents_read']:>12,}{manifest['bytes_read']:>16,}"]
    for step, c in manifest["removed"].items():
        lines.append(f"{'- ' + step:<22}{c['documents']:>12,}{c['bytes']:>16,}")
    for split in ("train", "val"):
        s = manifest[split]
        lines.append(f"{'= ' + split:<22}{s['documents']:>12,}{s['bytes']:>16,}")
    return "\n".join(lines)


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(PrepareSettings, "prepare", "Read text sources, clean them, drop low-quality documents "
                            "and exact and near duplicates, split by document into train/val, train (or reuse) a "
                            "byte-level BPE tokenizer and write token shards plus manifest.json.")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    settings.progress = settings.progress or (sys.stderr.isatty() and not output.json)
    timings: dict[str, float] = {}
    manifest = prepare(settings, timings=timings)
    result = summary(manifest)
    if not settings.dry_run:
        result["out"] = str(settings.out)
    if output.json:
        cli.print_json(result)
    elif settings.dry_run:
        print(table(manifest))
    else:
        cli.log(table(manifest))
        cli.log(f"wrote {settings.out}: train {manifest['train']['tokens']:,} tokens, val "
                f"{manifest['val']['tokens']:,} tokens, vocab {manifest['vocab_size']}")
    cli.log("seconds (wall/CPU): " + ", ".join(f"{k} {v:.2f}/{timings[k + '_cpu']:.2f}"
                                               for k, v in timings.items() if not k.endswith("_cpu")))
    return 0
