"""Shared fixtures: a small generated corpus, a dataset prepared from it and a tiny trained checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the king queen lord lady castle sword crown night day love death war peace honour brave "
         "speaks walks dreams fights sleeps weeps laughs rides sings thinks under over beside with "
         "against before after gold silver dark bright old young").split()


def write_corpus(directory: Path, n_docs: int = 24, sentences: int = 60, seed: int = 0) -> Path:
    """Documents of simple generated sentences: enough structure for a tiny model to learn."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(sentences):
            n = rng.randint(4, 10)
            lines.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        (directory / f"doc{d:03d}.txt").write_text(f"Chapter {d}\n\n" + "\n".join(lines) + "\n")
    return directory


@pytest.fixture
def one_thread():
    """Tiny models decode faster on one thread, and far faster when other processes share the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["vnni", "avx2"])
def products(request):
    """The int8-activation C++ products by VNNI's byte dot product and by AVX2's, where the build has VNNI;
    elsewhere AVX2's only."""
    from leangpt.quant import native

    if not native.available():
        pytest.skip("leangpt's C++ kernels cannot be built here")
    if native.set_vnni(request.param) != request.param:
        pytest.skip("no VNNI products in this build")
    yield request.param
    native.set_vnni(True)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "texts")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, corpus_dir) -> Path:
    from leangpt.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(PrepareSettings(source=[str(corpus_dir)], out=out, vocab_size=512, val_fraction=0.2, seed=0,
                            filters_enabled=False, workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, dataset_dir) -> Path:
    from leangpt.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    # GPT-2 trained with AdamW, as before optimizer=muon and cpu-5min: every stage keeps working on old checkpoints
    cfg = TrainConfig(preset="tiny", optimizer="adamw", max_steps=40, batch_size=8, eval_every=0, lr=3e-3)
    train(cfg, dataset_dir, out, progress=False)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `leangpt ARGV` in-process; returns (exit code, stdout, stderr)."""
    from leangpt.__main__ import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits on --help and usage errors
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
