import json
import random

import numpy as np
import pytest

from leangpt.data.clean import normalize, strip_gutenberg
from leangpt.data.prepare import prepare
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from tests.conftest import WORDS, run_cli, write_corpus


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
    prepare([str(corpus_dir)], again, vocab_size=512, val_fraction=0.2, seed=0)
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again / f).read_bytes() == (dataset_dir / f).read_bytes()
    other = tmp_path / "other"
    prepare([str(corpus_dir)], other, vocab_size=512, val_fraction=0.2, seed=5)
    assert json.loads((other / "manifest.json").read_text())["val"]["names"] != m["val"]["names"]


def test_reuses_a_tokenizer(tmp_path, dataset_dir, corpus_dir):
    out = tmp_path / "reuse"
    m = prepare([str(corpus_dir)], out, tokenizer_path=dataset_dir)
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
