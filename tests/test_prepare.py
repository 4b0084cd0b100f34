import json
import random
from pathlib import Path

import numpy as np
import pytest

from leangpt.data.clean import normalize, strip_gutenberg
from leangpt.data.prepare import PrepareSettings, prepare
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError
from tests.conftest import WORDS, run_cli


def settings(sources: list[str], out: Path, **kw) -> PrepareSettings:
    """The settings these tests were written for: no quality filters, one worker process."""
    return PrepareSettings(source=sources, out=out, **({"filters_enabled": False, "workers": 1} | kw))


def test_manifest_and_shards(dataset_dir):
    m = json.loads((dataset_dir / "manifest.json").read_text())
    ds = Dataset(dataset_dir)
    tk = TextTokenizer.load(dataset_dir)
    assert m["vocab_size"] == tk.vocab_size <= 512 and m["dtype"] == "uint16"
    assert m["tokenizer_sha256"] == tk.sha256()
    for split in ("train", "val"):
        toks = ds.tokens(split)
        assert m[split]["tokens"] == len(toks)
        assert (np.asarray(toks) == tk.eos_id).sum() == m[split]["documents"]  # one end-of-document per document
        assert m[split]["bytes"] == int(tk.token_bytes[np.asarray(toks)].sum())
    assert m["train"]["documents"] + m["val"]["documents"] == m["documents_kept"] == 24


def test_split_is_by_document_and_deterministic(dataset_dir, corpus_dir, tmp_path):
    m = json.loads((dataset_dir / "manifest.json").read_text())
    assert not set(m["train"]["names"]) & set(m["val"]["names"])
    again = tmp_path / "again"
    prepare(settings([str(corpus_dir)], again, vocab_size=512, val_fraction=0.2, seed=0))
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again / f).read_bytes() == (dataset_dir / f).read_bytes()
    other = tmp_path / "other"
    prepare(settings([str(corpus_dir)], other, vocab_size=512, val_fraction=0.2, seed=5))
    assert json.loads((other / "manifest.json").read_text())["val"]["names"] != m["val"]["names"]


def test_reuses_a_tokenizer(tmp_path, dataset_dir, corpus_dir):
    out = tmp_path / "reuse"
    m = prepare(settings([str(corpus_dir)], out, tokenizer=dataset_dir))
    assert m["tokenizer_sha256"] == json.loads((dataset_dir / "manifest.json").read_text())["tokenizer_sha256"]


def test_cleaning():
    text = "header\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nTo be.\r\nOr not.  \n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence"
    body, stripped = strip_gutenberg(text)
    assert stripped and normalize(body) == "To be.\nOr not."
    assert normalize("e\u0301") == "\u00e9"  # NFC


def test_embedded_corpus_is_found():
    from leangpt.data.sources import source_files

    files = source_files("shakespeare")
    assert len(files) >= 70 and all(name.startswith("shakespeare:") for name, _ in files)


def _dir_with(path, files: dict[str, str]):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


LONG = " ".join(random.Random(0).choices(WORDS, k=90))  # passes every default filter


@pytest.mark.parametrize("make_source, message", [
    (lambda p: p / "missing", "no such file"),
    (lambda p: _dir_with(p / "empty", {}), "has no files matching"),
    (lambda p: _dir_with(p / "blank", {"a.txt": "  \n\n", "b.md": "\x01\x02 \x7f"}), "removed by: cleaning 2"),
    (lambda p: _dir_with(p / "short", {"a.txt": "too short", "b.txt": LONG}), "at least 2 documents"),
    (lambda p: _dir_with(p / "filtered", {"a.txt": "too short", "b.txt": "#" + LONG.replace(" ", " #")}),
     "removed by: length 1, symbol_ratio 1"),
    (lambda p: _dir_with(p / "badjson", {"a.jsonl": '{"text": "fine"}\nnot json\n'}), "a.jsonl:2: bad JSONL line"),
    (lambda p: _dir_with(p / "nofield", {"a.jsonl": '{"body": "x"}\n'}), "a.jsonl:1: bad JSONL line (no field 'text')"),
])
def test_bad_sources_fail_cleanly(tmp_path, capsys, make_source, message):
    source = make_source(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["prepare", "--source", str(source), "--out", str(out)], capsys)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_parquet_without_the_column_fails_cleanly(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = " ".join(random.Random(2).choices(WORDS, k=90))
    pq.write_table(pa.table({"body": [LONG, other, LONG + " more"]}), tmp_path / "t.parquet")
    code, _, err = run_cli(["prepare", "--source", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no column 'text' (columns: body)" in err and not (tmp_path / "o").exists()
    code, out, err = run_cli(["prepare", "--source", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o"),
                              "--text-field", "body", "--vocab-size", "300", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["documents_read"] == 3 and summary["documents_kept"] == 2
    assert summary["removed"]["near_dedup"]["documents"] == 1  # LONG + " more" is a near-duplicate of LONG


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, corpus_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = run_cli(["prepare", "--source", str(corpus_dir), "--out", str(out), "--vocab-size", "300"], capsys)
    assert code == 2 and "already exists" in err and (out / "keep").exists()
    code, out_json, _ = run_cli(["prepare", "--source", str(corpus_dir), "--out", str(out), "--vocab-size", "300",
                                 "--overwrite", "--json"], capsys)
    assert code == 0 and json.loads(out_json)["vocab_size"] == 300 and not (out / "keep").exists()


def _corpus_files(path, texts: dict[str, str]):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (path / name).write_text(text)
    return path


def test_dry_run_writes_nothing_and_prints_the_table(tmp_path, capsys, corpus_dir):
    out = tmp_path / "never"
    code, stdout, _ = run_cli(["prepare", "--source", str(corpus_dir), "--out", str(out), "--dry-run",
                               "--near-dup-threshold", "0.8"], capsys)
    assert code == 0 and not out.exists() and not list(tmp_path.iterdir())
    for row in ("read", "- cleaning", "- length", "- duplicate_ngram", "- exact_dedup", "- near_dedup", "= train", "= val"):
        assert row in stdout


def test_same_output_for_any_worker_count_and_batch_size(tmp_path, corpus_dir, dataset_dir, monkeypatch):
    import leangpt.data.prepare as prep

    monkeypatch.setattr(prep, "BATCH_BYTES", 2000)  # many small batches through 2 worker processes
    out = tmp_path / "w2"
    prepare(settings([str(corpus_dir)], out, vocab_size=512, val_fraction=0.2, seed=0, workers=2))
    for f in ("train.bin", "val.bin", "tokenizer.json", "manifest.json"):
        assert (out / f).read_bytes() == (dataset_dir / f).read_bytes(), f


def test_dedup_counts_and_mixing_weights(tmp_path):
    rng = random.Random(3)
    docs = {f"d{i}.txt": " ".join(rng.choices(WORDS, k=120)) for i in range(10)}
    docs["z_copy.txt"] = docs["d0.txt"].upper() + "\n"  # exact duplicate after case/whitespace normalisation
    docs["near.txt"] = docs["d1.txt"] + " extra words"  # near duplicate
    a = _corpus_files(tmp_path / "a", docs)
    b = _corpus_files(tmp_path / "b", {f"e{i}.md": " ".join(rng.choices(WORDS, k=120)) for i in range(10)})
    (b / "skip.bin").write_bytes(b"\x00\x01binary")
    (b / "latin1.txt").write_bytes(" ".join(rng.choices(WORDS, k=60)).encode() + b" caf\xe9")
    m = prepare(settings([str(a), f"{b}@2.5"], tmp_path / "out", vocab_size=300, val_fraction=0.2, seed=1,
                         include=["*.txt", "*.md", "*.bin"], exclude=["e9.md"]))
    assert m["removed"]["exact_dedup"]["documents"] == 1 and m["removed"]["near_dedup"]["documents"] == 1
    assert m["exact_dedup"]["clusters"] == [{"kept": str(a / "d0.txt"), "removed": [str(a / "z_copy.txt")]}]
    assert m["near_dedup"]["clusters"][0]["kept"] == str(a / "d1.txt")
    src_b = m["sources"][1]
    assert src_b["binary_files_skipped"] == [str(b / "skip.bin")] and src_b["invalid_utf8_documents"] == 1
    assert not any(f["name"].endswith("e9.md") for f in src_b["files"])
    assert all(len(f["sha256"]) == 64 for s in m["sources"] for f in s["files"])
    # Weight 2.5: each train document of b is written 2 or 3 times; val documents once.
    train_b = sum(1 for n in m["train"]["names"] if n.startswith(str(b)))
    written_b = m["mixing"][1]["train_documents"]
    assert 2 * train_b <= written_b <= 3 * train_b and train_b < written_b
    assert m["train"]["documents"] == m["train"]["unique_documents"] + written_b - train_b
    ds, tk = Dataset(tmp_path / "out"), TextTokenizer.load(tmp_path / "out")
    toks = np.asarray(ds.tokens("train"))
    assert (toks == tk.eos_id).sum() == m["train"]["documents"]
    assert m["train"]["bytes"] == int(tk.token_bytes[toks].sum())


def test_jsonl_bad_lines_can_be_skipped_and_counted(tmp_path):
    rng = random.Random(4)
    rows = [json.dumps({"text": " ".join(rng.choices(WORDS, k=80))}) for _ in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(rows[:3] + ["{oops", '{"other": 1}'] + rows[3:]) + "\n")
    m = prepare(settings([str(tmp_path / "c.jsonl")], tmp_path / "out", vocab_size=300, skip_bad_lines=True))
    assert m["sources"][0]["bad_lines"] == 2 and m["documents_kept"] == 6
    assert f"{tmp_path / 'c.jsonl'}:7" in m["train"]["names"] + m["val"]["names"]  # names carry the line number


def test_shakespeare_editions_are_found_and_kept_in_one_split():
    """The two editions of a play (*_gut.txt, *_gut_f.txt) share 10-30% of their word 5-shingles, different plays
    under 1%. With the defaults, near-dedup (0.8) removes neither edition, and the split groups (0.05) pair every
    edition pair well above the threshold, merge no two plays, and keep each pair in one split."""
    from itertools import combinations

    from leangpt.data.clean import clean
    from leangpt.data.sources import source_files
    from leangpt.data.words import ngram_hashes, words

    files = source_files("shakespeare")
    names = [n for n, _ in files]
    sh = [np.unique(ngram_hashes(words(clean(p.read_text(errors="replace"), {})[0]).hashes, 5)) for _, p in files]
    # True Jaccard of every pair from shared shingles: sort all shingles once, count documents sharing each.
    allsh = np.concatenate(sh)
    doc = np.repeat(np.arange(len(sh)), [len(x) for x in sh])
    order = np.argsort(allsh, kind="stable")
    allsh, doc = allsh[order], doc[order]
    bounds = np.flatnonzero(np.concatenate([[True], allsh[1:] != allsh[:-1], [True]]))
    shared: dict[tuple[int, int], int] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo > 1:
            for pair in combinations(doc[lo:hi].tolist(), 2):
                shared[pair] = shared.get(pair, 0) + 1
    true = {(names[i], names[j]): c / (len(sh[i]) + len(sh[j]) - c) for (i, j), c in shared.items()}
    m = prepare(settings(["shakespeare"], Path("unused"), dry_run=True))
    assert m["removed"]["near_dedup"]["documents"] == 0 and m["documents_kept"] == len(files)
    related = {(p["a"], p["b"]) for p in m["split"]["related_pairs"]}
    must = {p for p, j in true.items() if j >= 0.1}
    assert len(must) >= 30 and must <= related
    assert all(true.get(p, 0.0) >= 0.03 for p in related)  # nothing far below the threshold: no two plays merged
    val = set(m["val"]["names"])
    assert val and all((a in val) == (b in val) for a, b in related)


def test_prepare_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, leangpt.data.prepare, leangpt.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_sample_is_bounded_and_recorded(tmp_path, corpus_dir):
    m = prepare(settings([str(corpus_dir)], tmp_path / "s", vocab_size=300, val_fraction=0.2, tokenizer_sample_bytes=1000))
    assert m["tokenizer_sample_bytes"] == 1000 and m["tokenizer_sample"]["bytes"] <= 1000
    assert m["tokenizer_sample"]["documents"] >= 1 and m["tokenizer_encoder"] == "tiktoken"
    with pytest.raises(UserError, match="tokenizer-sample-bytes"):
        prepare(settings([str(corpus_dir)], tmp_path / "z", tokenizer_sample_bytes=0))


def test_shards_are_the_same_with_the_tokenizers_encoder(tmp_path, corpus_dir, dataset_dir, monkeypatch):
    # The fixture dataset was encoded by tiktoken; encoding by `tokenizers` itself must give the same bytes.
    monkeypatch.setattr(TextTokenizer, "fast", property(lambda self: None))
    out = tmp_path / "hf"
    m = prepare(settings([str(corpus_dir)], out, vocab_size=512, val_fraction=0.2, seed=0))
    assert m["tokenizer_encoder"] == "tokenizers"
    assert json.loads((dataset_dir / "manifest.json").read_text())["tokenizer_encoder"] == "tiktoken"
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (out / f).read_bytes() == (dataset_dir / f).read_bytes(), f


def _parsed(argv: list[str]) -> PrepareSettings:
    from leangpt import cli
    from leangpt.data.prepare import build_parser

    return cli.parse(build_parser(), ["--source", "corpus", "--out", "data", *argv])[0]


def test_filter_settings_have_one_way_in(tmp_path):
    """--filter-set and --no-filter, --set filters.KEY and a config's filters: section reach the same settings."""
    from leangpt.data.filters import FilterSettings

    expected = FilterSettings(min_words=20)
    expected.max_top_ngram_char_fraction.n2 = 0.25
    expected.enabled.symbol_ratio = False
    config = tmp_path / "c.yaml"
    config.write_text("filters:\n  min_words: 20\n  max_top_ngram_char_fraction: {n2: 0.25}\n"
                      "  enabled: {symbol_ratio: false}\n")
    assert _parsed(["--filter-set", "min_words=20", "--filter-set", "max_top_ngram_char_fraction.2=0.25",
                    "--no-filter", "symbol_ratio"]).quality_filters() == expected
    assert _parsed(["--set", "filters.min_words=20", "--set", "filters.max_top_ngram_char_fraction.n2=0.25",
                    "--set", "filters.enabled.symbol_ratio=false"]).quality_filters() == expected
    assert _parsed(["--config", str(config)]).quality_filters() == expected
    assert _parsed(["--no-filters", "--filter-set", "min_words=20"]).quality_filters() is None
    assert _parsed([]).quality_filters() == FilterSettings()


def test_flags_fill_the_settings():
    s = _parsed(["--source", "more@2", "--vocab-size", "300", "--no-clean", "boilerplate", "--no-clean", "nfc",
                 "--no-exact-dedup", "--near-dup-threshold", "0", "--include", "*.txt", "--exclude", "x*",
                 "--tokenizer", "tok", "--skip-bad-lines", "--workers", "3", "--dry-run", "--overwrite"])
    assert s.source == ["corpus", "more@2"] and s.vocab_size == 300 and s.tokenizer == Path("tok")
    assert s.clean_steps() == {"boilerplate": False, "nfc": False, "control_chars": True, "whitespace": True}
    assert not s.exact_dedup and s.near_dup_threshold == 0.0 and (s.workers, s.dry_run, s.overwrite) == (3, True, True)
    assert (s.read_options().include, s.read_options().exclude, s.skip_bad_lines) == (("*.txt",), ("x*",), True)
    assert _parsed([]).read_options().include == ("*.txt", "*.md", "*.jsonl", "*.parquet")


@pytest.mark.parametrize("args, message", [
    (["--filter-set", "min_words=x"], "--filter-set: bad value for min_words: expected int"),
    (["--filter-set", "nope=1"], "--filter-set: unknown setting 'nope'"),
    (["--filter-set", "max_top_ngram_char_fraction.7=0.1"], "unknown setting 'max_top_ngram_char_fraction.n7'"),
    (["--filter-set", "min_words"], "--filter-set expects KEY=VALUE"),
    (["--set", "filters.nope=1"], "unknown setting 'filters.nope'"),
    (["--set", "filters.enabled.length=maybe"], "bad value for filters.enabled.length"),
    (["--no-filter", "bogus"], "bad value for --no-filter: expected one of length"),
    (["--no-clean", "bogus"], "bad value for --no-clean: expected one of boilerplate"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--num-perm", "1"], "--num-perm must be at least 2"),
    (["--num-perm", "64"], "--split-group-threshold 0.05: finding pairs at Jaccard 0.1 with chance 0.999 needs at "
                           "least 66 permutations, got 64"),
    (["--near-dup-threshold", "1"], "--near-dup-threshold must be in [0, 1)"),
])
def test_bad_settings_fail_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = run_cli(["prepare", "--source", "no_such_source", "--out", str(out), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
