"""Loss normalisation under accumulation and padding, fine-tuning pairs, schedules, noise scale, bad steps, hooks."""

import json
import math

import pytest
import torch

from leangpt.config import ModelConfig
from leangpt.data.batches import IGNORE_INDEX, micro_batches
from leangpt.data.sft import encode_pair, pad_examples
from leangpt.data.tokenizer import TextTokenizer
from leangpt.distributed import World
from leangpt.model import GPT
from leangpt.schedules import NoiseScale, noise_scale_accum, ramp_accum, warmup_stable_decay
from leangpt.train import TrainConfig, train
from leangpt.train_data import first_targets
from leangpt.train_step import accumulate_gradients, lm_loss, token_loss
from tests.conftest import run_cli


def test_accumulated_gradient_equals_big_batch_gradient_with_padding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=12, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (6, 12))
    y = torch.randint(0, 50, (6, 12))
    y[0, 3:] = IGNORE_INDEX  # rows with very different numbers of targets
    y[3, 1:] = IGNORE_INDEX
    y[4, :6] = IGNORE_INDEX
    n = int((y != IGNORE_INDEX).sum())
    lm_loss(model, x, y).backward()  # one big batch: mean over every target token
    big = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    loss, _ = accumulate_gradients(model, lm_loss, micro_batches(x, y, 2, 0, 3), n, World(), torch.device("cpu"), torch.float32)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, lm_loss(model, x, y))
    # The naive average of micro-batch means is a different (wrong) gradient here: the test can tell.
    model.zero_grad()
    (sum(lm_loss(model, xb, yb) for xb, yb in micro_batches(x, y, 2, 0, 3)) / 3).backward()
    assert not torch.allclose(model.tok_emb.weight.grad, big["tok_emb.weight"], rtol=1e-2, atol=1e-5)


def test_label_smoothing_and_z_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    y[0, 0] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    logp = logits.log_softmax(-1)[keep]
    nll = -logp.gather(1, y[keep][:, None]).squeeze(1)
    expected = (0.9 * nll - 0.1 * logp.mean(-1)).mean() + 1e-2 * (logits.logsumexp(-1)[keep] ** 2).mean()
    torch.testing.assert_close(token_loss(logits, y, label_smoothing=0.1, z_loss=1e-2), expected)


def test_pair_mask_covers_prompt_and_padding(tiny_checkpoint):
    tok = TextTokenizer.load(tiny_checkpoint)
    x, y = encode_pair(tok, "Question: the king", " speaks.", block_size=64)
    p, c = tok.encode("Question: the king"), tok.encode(" speaks.") + [tok.eos_id]
    assert x == (p + c)[:-1] and y == [IGNORE_INDEX] * (len(p) - 1) + c
    xb, yb = pad_examples([(x, y), (x[:3], y[:3])], tok.eos_id)
    assert xb.shape == yb.shape == (2, len(x)) and (yb[1, 3:] == IGNORE_INDEX).all()


def test_fine_tune_on_jsonl_pairs(tmp_path, capsys, tiny_checkpoint):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Who rides {i}?", "completion": " the brave king."}) + "\n"
                             for i in range(12)))
    out = tmp_path / "ft"
    code, stdout, err = run_cli(["train", "--data", str(pairs), "--init", str(tiny_checkpoint), "--out", str(out),
                                 "--set", "max_steps=30", "--set", "batch_size=4", "--set", "lr=3e-3",
                                 "--set", "log_every=1", "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0] / 3  # a fixed completion is learned fast, when only it is scored
    assert json.loads(stdout)["val_loss"] < 1.0
    code, stdout, err = run_cli(["train", "--data", str(pairs), "--init", str(tiny_checkpoint), "--out", str(out),
                                 "--overwrite", "--set", "max_steps=1", "--set", "eval_tokens=5", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["val_tokens_scored"] == 5, err  # SFT evaluation honours eval_tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code, _, err = run_cli(["train", "--data", str(bad), "--init", str(tiny_checkpoint), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "bad.jsonl:2" in err


def test_schedules():
    lrs = [warmup_stable_decay(s, 100, 10, 20, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10:80] == [1.0] * 70 and lrs[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    assert [ramp_accum(t, 100, 1, 5) for t in (0, 50, 99, 100, 10**6)] == [1, 3, 4, 5, 5]


def test_noise_scale_recovers_a_known_b_simple():
    """Gradients G + noise with covariance sigma^2 I: B_simple = tr(Sigma) / |G|^2 = d sigma^2 / |G|^2."""
    torch.manual_seed(0)
    d, sigma, b_small, k = 200, 2.0, 4, 8
    g = torch.randn(d) * 0.5
    truth = d * sigma**2 / float(g.square().sum())
    est = NoiseScale(ema=0.99)
    for _ in range(400):
        smalls = g + torch.randn(k, d) * sigma / math.sqrt(b_small)  # mean gradient of b_small examples
        est.update(float(smalls.square().sum(1).mean()), float(smalls.mean(0).square().sum()), b_small, b_small * k)
    assert est.estimate == pytest.approx(truth, rel=0.15)


def test_noise_scale_growth_rule():
    assert noise_scale_accum(None, 2, 4, 64) == 2
    assert noise_scale_accum(7.9, 2, 4, 64) == 2  # 8 sequences per step already cover B_simple
    assert noise_scale_accum(8.5, 2, 4, 64) == 3
    assert noise_scale_accum(100.0, 2, 4, 64) == 25
    assert noise_scale_accum(1e6, 2, 4, 64) == 64
    assert noise_scale_accum(1.0, 5, 4, 64) == 5  # never shrinks


def test_noise_scale_schedule_logs_the_estimate(tmp_path, dataset_dir):
    cfg = TrainConfig(preset="tiny", max_steps=4, batch_size=2, grad_accum=2, max_grad_accum=6,
                      batch_schedule="noise_scale", eval_every=0, eval_tokens=128, log_every=1, precision="fp32")
    train(cfg, dataset_dir, tmp_path / "ns", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ns" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_loss" in r]
    assert len(steps) == 4 and all(r["noise_scale"] > 0 and r["grad_accum"] >= 2 for r in steps)


def test_non_finite_steps_are_skipped_then_stop(tmp_path, dataset_dir):
    calls = []

    def nan_loss(model, x, y):
        return lm_loss(model, x, y) * float("nan")

    cfg = TrainConfig(preset="tiny", max_steps=20, batch_size=2, eval_every=0, log_every=1, max_bad_steps=3,
                      precision="fp32")
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=512))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="3 steps in a row had a non-finite loss"):
        train(cfg, dataset_dir, tmp_path / "nan", loss_fn=nan_loss, model=model, progress=False,
              on_step_end=lambda m: calls.append(m))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped step"
    assert len(calls) == 3 and calls[0] is model and not (tmp_path / "nan").exists()


def test_aux_module_is_trained_and_saved_in_train_state(tmp_path, dataset_dir):
    aux = torch.nn.Linear(64, 8, bias=False)
    start = aux.weight.detach().clone()

    def loss_with_aux(model, x, y):
        return lm_loss(model, x, y) + aux(model.tok_emb.weight[:4] if hasattr(model, "tok_emb") else 0).square().mean()

    cfg = TrainConfig(preset="tiny", max_steps=3, batch_size=2, eval_every=0, eval_tokens=128, precision="fp32")
    train(cfg, dataset_dir, tmp_path / "aux", loss_fn=loss_with_aux, aux_module=aux, progress=False)
    from leangpt import train_state
    tensors = train_state.read(train_state.latest(tmp_path / "aux"))[0]
    assert not torch.equal(aux.weight.detach(), start)
    torch.testing.assert_close(tensors["aux.weight"], aux.weight.detach())
    from safetensors.torch import load_file
    assert not any("aux" in k for k in load_file(str(tmp_path / "aux" / "model.safetensors")))


def test_first_targets_keeps_the_first_n_target_tokens():
    ex = [([1, 2, 3], [IGNORE_INDEX, 5, 6]), ([7, 8], [9, 10]), ([11], [12])]
    assert first_targets(ex, None) == ex
    assert first_targets(ex, 3) == [ex[0], ([7], [9])]
    assert first_targets(ex, 4) == ex[:2] and first_targets(ex, 1) == [([1, 2], [IGNORE_INDEX, 5])]
