import json
import sys

import pytest
import torch

from leangpt.checkpoint import load_checkpoint
from leangpt.data.shards import Dataset
from leangpt.evaluate import evaluate_tokens
from leangpt.model import GPT
from leangpt.schedules import cosine_with_warmup
from leangpt.train import TrainConfig, train
from tests.conftest import run_cli, write_corpus


def test_training_lowers_val_loss(tiny_checkpoint, dataset_dir):
    model, tokenizer, meta = load_checkpoint(tiny_checkpoint)
    ds = Dataset(dataset_dir)
    torch.manual_seed(0)
    untrained = GPT(model.config).eval()
    before = evaluate_tokens(untrained, ds.tokens("val"), tokenizer.token_bytes, 64)["loss"]
    after = evaluate_tokens(model, ds.tokens("val"), tokenizer.token_bytes, 64)["loss"]
    assert after < before - 1.0
    assert meta["step"] == 40 and meta["metrics"]["val_loss"] == pytest.approx(after, rel=1e-4)
    lines = (tiny_checkpoint / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 40


def test_cosine_schedule_shape():
    lrs = [cosine_with_warmup(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(0.1)


def test_fine_tune_from_checkpoint(tmp_path, tiny_checkpoint, dataset_dir):
    out = tmp_path / "ft"
    final = train(TrainConfig(max_steps=5, batch_size=4, eval_every=0, eval_tokens=512), dataset_dir, out,
                  init=tiny_checkpoint, progress=False)
    model, _, meta = load_checkpoint(out)
    assert meta["parent"] == str(tiny_checkpoint) and final["step"] == 5


def test_init_refuses_other_tokenizer(tmp_path, capsys, tiny_checkpoint):
    other = tmp_path / "other"
    from leangpt.data.prepare import PrepareSettings, prepare
    prepare(PrepareSettings(source=[str(write_corpus(tmp_path / "c2", n_docs=4, seed=3))], out=other, vocab_size=300,
                            filters_enabled=False))
    code, _, err = run_cli(["train", "--data", str(other), "--out", str(tmp_path / "o"), "--init", str(tiny_checkpoint)], capsys)
    assert code == 2 and "prepare --tokenizer" in err


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "unknown preset"),
    (["--set", "nope=1"], "unknown setting 'nope'"),
    (["--set", "max_steps=abc"], "bad value for max_steps"),
    (["--set", "lr=-1"], "lr must be > 0"),
    (["--set", "model.n_head=3"], "divisible"),
    (["--set", "max_steps"], "KEY=VALUE"),
])
def test_bad_settings_fail_cleanly(tmp_path, capsys, dataset_dir, extra, message):
    out = tmp_path / "ck"
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny", *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_corpus_too_short_for_a_window(tmp_path, capsys):
    from leangpt.data.prepare import PrepareSettings, prepare
    data = tmp_path / "short"
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"tiny document {i}")
    prepare(PrepareSettings(source=[str(src)], out=data, vocab_size=300, filters_enabled=False))
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "ck"), "--preset", "tiny"], capsys)
    assert code == 2 and "fewer than one training window" in err and not (tmp_path / "ck").exists()


def test_yaml_config_and_existing_output(tmp_path, capsys, dataset_dir, tiny_checkpoint):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2\nbatch_size: 2\neval_tokens: 256\nmodel:\n  n_layer: 1\n")
    out = tmp_path / "ck"
    code, stdout, _ = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny",
                               "--config", str(cfg), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 2
    assert load_checkpoint(out)[0].config.n_layer == 1
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(tmp_path / "x"), "--init", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err


def test_tensorboard_event_files(tmp_path, dataset_dir):
    logs = tmp_path / "tb"
    train(TrainConfig(preset="tiny", max_steps=2, batch_size=2, eval_every=0, eval_tokens=256, log_every=1),
          dataset_dir, tmp_path / "ck", tensorboard=logs, progress=False)
    assert list(logs.glob("events.out.tfevents.*"))


def test_activation_checkpointing_gives_the_same_weights(tmp_path, dataset_dir):
    common = dict(preset="tiny", max_steps=3, batch_size=4, eval_every=0, eval_tokens=256, precision="fp32")
    train(TrainConfig(**common), dataset_dir, tmp_path / "plain", progress=False)
    train(TrainConfig(**common, activation_checkpointing=True), dataset_dir, tmp_path / "ac", progress=False)
    plain, ac = load_checkpoint(tmp_path / "plain")[0], load_checkpoint(tmp_path / "ac")[0]
    for (name, a), (_, b) in zip(plain.state_dict().items(), ac.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_val_figures_are_those_of_leangpt_eval(tmp_path, dataset_dir, capsys):
    """Training's final evaluation is `leangpt eval` on the same tokens: the same function, the same precision."""
    out = tmp_path / "ck"
    final = train(TrainConfig(preset="tiny", max_steps=3, batch_size=4, eval_every=0, eval_tokens=300), dataset_dir,
                  out, progress=False)
    code, stdout, _ = run_cli(["eval", "--model", str(out), "--data", str(dataset_dir), "--max-tokens", "300",
                               "--batch-size", "4", "--json"], capsys)
    assert code == 0
    scored = json.loads(stdout)
    assert final["val_tokens_scored"] == scored["tokens"] == 300
    assert final["val_bits_per_byte"] == scored["bits_per_byte"] and final["val_loss"] == scored["loss"]


def test_nproc_relaunches_the_same_command_under_torchrun(tmp_path, capsys, dataset_dir, monkeypatch):
    from leangpt import distributed

    calls = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("RANK", raising=False)
    rest = ["--data", str(dataset_dir), "--out", str(tmp_path / "ck")]
    assert run_cli(["train", *rest, "--nproc", "2", "--preset", "tiny"], capsys)[0] == 0
    assert run_cli(["train", "--nproc=2", *rest], capsys)[0] == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "leangpt",
                "train"]
    assert calls == [[*launcher, *rest, "--preset", "tiny"], [*launcher, *rest]] and not (tmp_path / "ck").exists()
    code, _, err = run_cli(["train", *rest, "--nproc", "0"], capsys)
    assert code == 2 and "--nproc must be >= 1" in err
