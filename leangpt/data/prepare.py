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
from leangpt.data.clean import CLEAN_STEPS, clean
from leangpt.data.dedup import MinHasher, exact_key, near_duplicates
from leangpt.data.filters import FILTER_NAMES, FilterConfig, failing_filter
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


@dataclasses.dataclass
class _Config:
    clean_steps: dict[str, bool]
    filters: FilterConfig | None
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


def prepare(sources: list[str], out: Path, vocab_size: int = 8192, tokenizer_path: Path | None = None,
            val_fraction: float = 0.1, seed: int = 0, overwrite: bool = False, *,
            read: ReadOptions | None = None, clean_steps: dict[str, bool] | None = None,
            filters: FilterConfig | None = None, exact_dedup: bool = True, near_dup_threshold: float | None = 0.8,
            split_group_threshold: float | None = 0.05, num_perm: int = 128, shingle: int = 5, workers: int = 1,
            tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES, dry_run: bool = False, progress: bool = False,
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Build a dataset directory (see the module docstring); returns the manifest.

    filters=None applies no quality filter (the CLI passes FilterConfig() unless --no-filters); threshold None
    (or 0) turns near-dedup or split grouping off. With dry_run nothing is written and no tokenizer is trained.
    A timings dict, when given, receives each stage's wall and CPU seconds (kept out of the manifest, which must
    not vary from run to run).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    for name, thr in (("--near-dup-threshold", near_dup_threshold), ("--split-group-threshold", split_group_threshold)):
        if thr is not None and not 0.0 <= thr < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {thr}")
    if tokenizer_path is None and tokenizer_sample_bytes < 1:
        raise UserError(f"--tokenizer-sample-bytes must be at least 1, got {tokenizer_sample_bytes}")
    if not dry_run:
        check_output_dir(out, overwrite)
    read = read or ReadOptions()
    specs = [SourceSpec.parse(s) for s in sources]
    if timings is None:
        timings = {}
    need_sigs = bool(near_dup_threshold) or bool(split_group_threshold)
    cfg = _Config({s: True for s in CLEAN_STEPS} | (clean_steps or {}), filters,
                  MinHasher(num_perm, shingle) if need_sigs else None)
    if dry_run:
        return _run(specs, None, read, cfg, locals())
    with atomic_dir(out) as tmp:
        return _run(specs, tmp, read, cfg, locals())


def _run(specs: list[SourceSpec], tmp: Path | None, read: ReadOptions, cfg: _Config, o: dict[str, Any]) -> dict[str, Any]:
    source_stats = [SourceStats(s.path, s.weight) for s in specs]
    cleaning = {s: _counter() for s in CLEAN_STEPS}
    removed = {k: _counter() for k in ("empty", *FILTER_NAMES, "exact_dedup", "near_dedup")}
    read_count = _counter()
    spool = Spool(tmp / "documents.spool") if tmp is not None else None
    names: list[str] = []
    doc_source: list[int] = []
    doc_bytes: list[int] = []
    sigs: list[np.ndarray] = []
    seen: dict[bytes, int] = {}
    exact_clusters: dict[int, list[str]] = {}

    def documents() -> Iterator[tuple[int, Document]]:
        for i, (spec, stats) in enumerate(zip(specs, source_stats)):
            for doc in read_source(spec, read, stats):
                yield i, doc

    o["stages"] = stages = _Stages(o["timings"])
    bar = tqdm(total=None, unit="B", unit_scale=True, desc="read, clean, filter, hash", disable=not o["progress"])
    try:
        for src, doc, a in _analysed(_batches(documents()), cfg, o["workers"]):
            read_count["documents"] += 1
            read_count["bytes"] += a.bytes_in
            bar.update(a.bytes_in)
            for step, nbytes in a.cleaned.items():
                cleaning[step]["documents"] += 1
                cleaning[step]["bytes"] += nbytes
            nbytes = a.nbytes
            if a.removed_by:
                removed[a.removed_by]["documents"] += 1
                removed[a.removed_by]["bytes"] += nbytes
                continue
            if o["exact_dedup"]:
                first = seen.setdefault(a.key, len(names))
                if first != len(names):
                    removed["exact_dedup"]["documents"] += 1
                    removed["exact_dedup"]["bytes"] += nbytes
                    exact_clusters.setdefault(first, []).append(doc.name)
                    continue
            if spool is not None:
                spool.append(doc.text if a.text is None else a.text)
            names.append(doc.name)
            doc_source.append(src)
            doc_bytes.append(nbytes)
            if a.signature is not None:
                sigs.append(a.signature)
    finally:
        bar.close()
    del seen
    stages.lap("read_clean_filter_hash")

    n = len(names)
    keep = np.ones(n, dtype=bool)
    near: dict[str, Any] = {"threshold": o["near_dup_threshold"] or None, "clusters": []}
    signatures = np.stack(sigs) if sigs else np.zeros((n, 0), np.uint32)
    del sigs
    if o["near_dup_threshold"] and n:
        res = near_duplicates(signatures, o["near_dup_threshold"])
        near.update(bands=res.bands, rows=res.rows)
        for cluster in res.clusters:
            keep[cluster[1:]] = False
            removed["near_dedup"]["documents"] += len(cluster) - 1
            removed["near_dedup"]["bytes"] += sum(doc_bytes[i] for i in cluster[1:])
            pair_est = {j: e for i, j, e in res.pairs if i == cluster[0]}
            near["clusters"].append({"kept": names[cluster[0]],
                                     "removed": [{"name": names[j], "jaccard_estimate": round(pair_est.get(j, 0.0), 4)}
                                                 for j in cluster[1:]]})
    manifest_steps = {"removed": {"cleaning": {"documents": removed["empty"]["documents"],
                                               "bytes": sum(c["bytes"] for c in cleaning.values())},
                                  **{f: removed[f] for f in FILTER_NAMES},
                                  "exact_dedup": removed["exact_dedup"], "near_dedup": removed["near_dedup"]}}
    kept_idx = np.flatnonzero(keep)
    if len(kept_idx) == 0:
        parts = [f"{k} {v['documents']}" for k, v in manifest_steps["removed"].items() if v["documents"]]
        raise UserError(f"no documents left out of {read_count['documents']} read"
                        + (f" (removed by: {', '.join(parts)})" if parts else " (the sources hold no documents)"))
    if len(kept_idx) < 2:
        raise UserError("need at least 2 documents to split into train and val by document "
                        f"({read_count['documents']} read, {len(kept_idx)} kept)")

    groups: list[list[int]] = []
    related: list[dict[str, Any]] = []
    group_thr = o["split_group_threshold"]
    if group_thr:
        res = near_duplicates(signatures[kept_idx], group_thr)
        groups = res.clusters
        related = [{"a": names[kept_idx[i]], "b": names[kept_idx[j]], "jaccard_estimate": round(e, 4)}
                   for i, j, e in res.pairs]
    del signatures
    is_val_kept = _split_units(len(kept_idx), groups, o["val_fraction"], o["seed"])
    stages.lap("dedup_split")
    split_of = np.full(n, -1, dtype=np.int8)  # -1 removed, 0 train, 1 val
    split_of[kept_idx] = is_val_kept.astype(np.int8)
    # Mixing: a train document of a source with weight w is written floor(w) times, plus once more with
    # probability frac(w) (seeded); val documents are written once, so eval measures each source as it is.
    weights = np.array([s.weight for s in specs])[np.array(doc_source, dtype=np.int64)] if n else np.zeros(0)
    u = np.random.default_rng([o["seed"], 1]).random(n)
    copies = np.where(split_of == 0, np.floor(weights) + (u < weights - np.floor(weights)), 0).astype(np.int64)
    copies[split_of == 1] = 1
    copies[split_of < 0] = 0

    manifest: dict[str, Any] = {
        "sources": [st.to_dict() for st in source_stats],
        "documents_read": read_count["documents"], "bytes_read": read_count["bytes"],
        "documents_kept": int(len(kept_idx)),
        "cleaning": cleaning, **manifest_steps,
        "filters": dataclasses.asdict(cfg.filters) if cfg.filters else None,
        "exact_dedup": {"enabled": o["exact_dedup"],
                        "clusters": [{"kept": names[k], "removed": v} for k, v in exact_clusters.items()]},
        "near_dedup": {**near, "num_perm": o["num_perm"], "shingle_words": o["shingle"]},
        "split": {"seed": o["seed"], "val_fraction": o["val_fraction"], "group_threshold": group_thr or None,
                  "related_pairs": related, "groups": [[names[kept_idx[i]] for i in g] for g in groups]},
        "mixing": [{"source": s.path, "weight": s.weight,
                    "train_documents": int(copies[(split_of == 0) & (np.array(doc_source) == i)].sum()) if n else 0}
                   for i, s in enumerate(specs)],
    }
    if tmp is None:
        for split, flag in (("train", 0), ("val", 1)):
            idx = np.flatnonzero(split_of == flag)
            manifest[split] = {"documents": int(copies[idx].sum()), "unique_documents": int(len(idx)),
                               "bytes": int(sum(doc_bytes[i] * copies[i] for i in idx)),
                               "names": [names[i] for i in idx]}
        return manifest
    spool.close_writing()
    try:
        _tokenize(spool, names, split_of, copies, tmp, manifest, o)
    finally:
        spool.close()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


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


def _tokenize(spool: Spool, names: list[str], split_of: np.ndarray, copies: np.ndarray, tmp: Path,
              manifest: dict[str, Any], o: dict[str, Any]) -> None:
    sample: dict[str, int] | None = None
    if o["tokenizer_path"] is not None:
        tokenizer = TextTokenizer.load(o["tokenizer_path"])
    else:
        sample = {"documents": 0, "bytes": 0}
        tokenizer = TextTokenizer.train(_tokenizer_sample(spool, np.flatnonzero(split_of == 0),
                                                          o["tokenizer_sample_bytes"], o["seed"], sample),
                                        o["vocab_size"])
    o["stages"].lap("tokenizer_training")
    dtype = token_dtype(tokenizer.vocab_size)
    manifest.update(vocab_size=tokenizer.vocab_size, eos_token=tokenizer.eos_token, eos_token_id=tokenizer.eos_id,
                    tokenizer_sha256=tokenizer.sha256(),
                    tokenizer_source=str(o["tokenizer_path"]) if o["tokenizer_path"] else "trained",
                    tokenizer_sample_bytes=None if o["tokenizer_path"] else o["tokenizer_sample_bytes"],
                    tokenizer_sample=sample, dtype=dtype.name)
    writers = [TokenWriter(tmp / f"{s}.bin", dtype, tokenizer.eos_id) for s in ("train", "val")]
    splits = [{"documents": 0, "unique_documents": 0, "bytes": 0, "tokens": 0, "names": []} for _ in writers]
    bar = tqdm(total=int((np.array([spool.nbytes(i) for i in range(len(spool))]) * copies).sum()), unit="B",
               unit_scale=True, desc="tokenize", disable=not o["progress"])

    def batches() -> Iterator[list[int]]:
        batch: list[int] = []
        size = 0
        for i in np.flatnonzero(copies > 0).tolist():
            batch.append(i)
            size += spool.nbytes(i)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def write(batch: list[int], ids: list[list[int]]) -> None:
        for i, doc_ids in zip(batch, ids):
            s = int(split_of[i])
            writers[s].write([doc_ids] * int(copies[i]))
            rec = splits[s]
            rec["documents"] += int(copies[i])
            rec["unique_documents"] += 1
            rec["bytes"] += spool.nbytes(i) * int(copies[i])
            rec["names"].append(names[i])
            bar.update(spool.nbytes(i) * int(copies[i]))

    # The next batch is encoded (by the tokenizer's own threads) while this one is written.
    with ThreadPoolExecutor(1) as ahead:
        pending = None
        for batch in batches():
            job = ahead.submit(lambda b: tokenizer.encode_batch([spool[i] for i in b]), batch)
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = (batch, job)
        if pending is not None:
            write(pending[0], pending[1].result())
    bar.close()
    for w, rec, split in zip(writers, splits, ("train", "val")):
        w.close()
        rec["tokens"] = w.tokens
        manifest[split] = rec
    tokenizer.save(tmp)
    manifest["tokenizer_encoder"] = "tiktoken" if tokenizer.fast is not None else "tokenizers"
    o["stages"].lap("tokenize_write")


def _filter_config(args) -> FilterConfig | None:
    if args.no_filters:
        return None
    cfg = FilterConfig()
    for name in args.no_filter:
        if name not in FILTER_NAMES:
            raise UserError(f"--no-filter: unknown filter {name!r}; choose from {', '.join(FILTER_NAMES)}")
        cfg.enabled[name] = False
    scalars = {f.name: f.type for f in dataclasses.fields(cfg) if f.type in ("int", "float")}
    for item in args.filter_set:
        key, sep, value = item.partition("=")
        head, _, n = key.strip().partition(".")
        try:
            if sep and head in scalars and not n:
                setattr(cfg, head, int(value) if scalars[head] == "int" else float(value))
            elif sep and head in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction") and n.isdigit():
                getattr(cfg, head)[int(n)] = float(value)
            else:
                raise UserError(f"--filter-set: unknown setting {item!r}; known: {', '.join(scalars)}, "
                                "max_top_ngram_char_fraction.N, max_duplicate_ngram_char_fraction.N")
        except ValueError:
            raise UserError(f"--filter-set {item}: not a number") from None
    return cfg


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("prepare", "Read text sources, clean them, drop low-quality documents and exact and near "
                              "duplicates, split by document into train/val, train (or reuse) a byte-level BPE "
                              "tokenizer and write token shards plus manifest.json.")
    p.add_argument("--source", action="append", required=True, metavar="SOURCE[@WEIGHT]",
                   help="'shakespeare' (the embedded corpus), a .txt/.md file, a .jsonl or .parquet file, or a "
                        "directory of them (recursive); repeatable. '@WEIGHT' sets the source's mixing weight: "
                        "expected copies of each of its documents in the train split (e.g. @0.5, @2)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, end-of-document token included")
    p.add_argument("--tokenizer", type=Path,
                   help="reuse the tokenizer of a dataset, checkpoint or Hugging Face tokenizer directory instead of training one")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=TOKENIZER_SAMPLE_BYTES,
                   help="train the tokenizer on at most this many bytes of train documents: whole documents in "
                        "seeded random order (default 4 MiB; more gives slightly fewer tokens per byte, slower)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split, mixing and tokenizer sample")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="in directories, read files matching this glob (name or relative path); repeatable "
                        "(default: *.txt *.md *.jsonl *.parquet)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="in directories, skip files matching this glob; repeatable")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column that holds the text")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) JSONL lines that are not JSON or lack the text field instead of failing")
    p.add_argument("--no-clean", action="append", default=[], choices=CLEAN_STEPS, metavar="STEP",
                   help=f"turn a cleaning step off; repeatable; steps: {', '.join(CLEAN_STEPS)}")
    p.add_argument("--no-filters", action="store_true", help="apply no quality filter")
    p.add_argument("--no-filter", action="append", default=[], metavar="NAME",
                   help=f"turn one quality filter off; repeatable; filters: {', '.join(FILTER_NAMES)}")
    p.add_argument("--filter-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a filter threshold, e.g. min_words=20 or max_top_ngram_char_fraction.2=0.25; repeatable")
    p.add_argument("--no-exact-dedup", action="store_true", help="keep documents whose normalised text is identical")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard (word 5-shingles) at which documents are near-duplicates; "
                        "one per cluster is kept; 0 turns near-dedup off")
    p.add_argument("--split-group-threshold", type=float, default=0.05,
                   help="documents at least this similar (MinHash Jaccard) are kept in the same split, so that "
                        "related texts (e.g. two editions of a play) do not leak from train into val; 0 turns it off")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations per document")
    p.add_argument("--shingle", type=int, default=5, help="words per MinHash shingle")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for cleaning, filters and hashing (tokenization uses a thread per core)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what cleaning, each filter and dedup would remove, and the split; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the manifest's summary as one JSON object on stdout")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    read = ReadOptions(tuple(args.include) if args.include else DEFAULT_INCLUDE, tuple(args.exclude),
                       args.text_field, args.skip_bad_lines)
    timings: dict[str, float] = {}
    manifest = prepare(args.source, args.out, args.vocab_size, args.tokenizer, args.val_fraction, args.seed,
                       args.overwrite, read=read, clean_steps={s: False for s in args.no_clean},
                       filters=_filter_config(args), exact_dedup=not args.no_exact_dedup,
                       near_dup_threshold=args.near_dup_threshold or None,
                       split_group_threshold=args.split_group_threshold or None, num_perm=args.num_perm,
                       shingle=args.shingle, workers=args.workers, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                       dry_run=args.dry_run, progress=sys.stderr.isatty() and not args.json, timings=timings)
    result = summary(manifest)
    if not args.dry_run:
        result["out"] = str(args.out)
    if args.json:
        cli.print_json(result)
    elif args.dry_run:
        print(table(manifest))
    else:
        cli.log(table(manifest))
        cli.log(f"wrote {args.out}: train {manifest['train']['tokens']:,} tokens, val {manifest['val']['tokens']:,} "
                f"tokens, vocab {manifest['vocab_size']}")
    cli.log("seconds (wall/CPU): " + ", ".join(f"{k} {v:.2f}/{timings[k + '_cpu']:.2f}"
                                               for k, v in timings.items() if not k.endswith("_cpu")))
    return 0
