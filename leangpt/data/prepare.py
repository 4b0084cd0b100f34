"""`leangpt prepare`: sources → cleaned documents → tokenizer → document-level split → train.bin / val.bin + manifest."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from leangpt import cli
from leangpt.data.clean import normalize, strip_gutenberg
from leangpt.data.shards import token_dtype
from leangpt.data.sources import Document, read_documents
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError
from leangpt.fsutil import atomic_dir, check_output_dir


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("prepare", "Read text sources, clean them, train (or reuse) a byte-level BPE tokenizer, "
                              "split by document into train/val and write token shards plus manifest.json.")
    p.add_argument("--source", action="append", required=True,
                   help="'shakespeare' (the embedded corpus), a .txt/.md file, or a directory of them; repeatable")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, end-of-document token included")
    p.add_argument("--tokenizer", type=Path,
                   help="reuse the tokenizer of a dataset, checkpoint or Hugging Face tokenizer directory instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object on stdout")
    return p


def load_documents(sources: list[str]) -> tuple[list[Document], dict[str, Any]]:
    """Read and clean every source; returns kept documents and cleaning statistics."""
    docs: list[Document] = []
    stats: dict[str, Any] = {"sources": [], "documents_read": 0, "bytes_read": 0,
                             "gutenberg_boilerplate_stripped": 0, "empty_removed": 0}
    for source in sources:
        files = []
        for doc, sha in read_documents(source):
            files.append({"name": doc.name, "sha256": sha})
            stats["documents_read"] += 1
            stats["bytes_read"] += len(doc.text.encode("utf-8"))
            text, stripped = strip_gutenberg(doc.text)
            stats["gutenberg_boilerplate_stripped"] += stripped
            text = normalize(text)
            if not text.strip():
                stats["empty_removed"] += 1
                continue
            docs.append(Document(doc.name, text))
        stats["sources"].append({"source": source, "files": files})
    if not docs:
        raise UserError(f"no text found in {', '.join(sources)}")
    return docs, stats


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Shuffle documents with the seed and hold out a fraction of them whole: no document is in both splits."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(docs) < 2:
        raise UserError("need at least 2 documents to split into train and val by document")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def encode_split(tokenizer: TextTokenizer, docs: list[Document]) -> np.ndarray:
    """Token ids of every document, each followed by the end-of-document token."""
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch([d.text for d in docs]):
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
    return np.array(ids, dtype=token_dtype(tokenizer.vocab_size))


def prepare(sources: list[str], out: Path, vocab_size: int = 8192, tokenizer_path: Path | None = None,
            val_fraction: float = 0.1, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    check_output_dir(out, overwrite)
    docs, stats = load_documents(sources)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if tokenizer_path is not None:
        tokenizer = TextTokenizer.load(tokenizer_path)
    else:
        tokenizer = TextTokenizer.train((d.text for d in train_docs), vocab_size)
    manifest: dict[str, Any] = {
        **stats,
        "documents_kept": len(docs),
        "vocab_size": tokenizer.vocab_size,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.sha256(),
        "tokenizer_source": str(tokenizer_path) if tokenizer_path else "trained",
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "split": {"seed": seed, "val_fraction": val_fraction},
    }
    with atomic_dir(out) as tmp:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            tokens = encode_split(tokenizer, split_docs)
            tokens.tofile(tmp / f"{split}.bin")
            manifest[split] = {
                "documents": len(split_docs),
                "bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
                "tokens": int(len(tokens)),
                "names": [d.name for d in split_docs],
            }
        tokenizer.save(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = prepare(args.source, args.out, args.vocab_size, args.tokenizer, args.val_fraction, args.seed, args.overwrite)
    summary = {k: manifest[k] for k in ("documents_read", "documents_kept", "vocab_size", "tokenizer_sha256")}
    summary.update({s: {k: v for k, v in manifest[s].items() if k != "names"} for s in ("train", "val")})
    summary["out"] = str(args.out)
    if args.json:
        cli.print_json(summary)
    else:
        cli.log(f"wrote {args.out}: train {summary['train']['tokens']:,} tokens / {summary['train']['documents']} docs, "
                f"val {summary['val']['tokens']:,} tokens / {summary['val']['documents']} docs, vocab {manifest['vocab_size']}")
    return 0
