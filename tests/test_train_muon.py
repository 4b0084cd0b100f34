"""optimizer=muon: torch's Muon on the hidden matrices, AdamW on the rest; its update against a direct computation,
its schedule, bitwise resume after SIGKILL, DDP equal to one process, and FSDP refused."""

import math
import signal

import pytest
import torch

from leangpt import train_state
from leangpt.config import ModelConfig
from leangpt.model import GPT
from leangpt.train import TrainConfig
from leangpt.train_step import MUON_START_MOMENTUM, Muon, configure_optimizer, muon_param_names, schedule_optimizers
from tests.conftest import run_cli
from tests.test_train_dist import BASE, losses, run
from tests.test_train_resume import COMMON, leangpt, wait_for_state, weights

MUON = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95, muon_momentum_warmup=10,
                   max_steps=100, warmup_steps=0, lr_schedule="constant")


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration written out in float64: the reference torch's bf16 one approximates."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / g.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def holder_params(model: GPT) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in torch.nn.ModuleDict({"model": model}).named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw(tie):
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=100, tie_embeddings=tie, norm="rmsnorm", qk_norm=True,
                                        mlp="swiglu", pos="rope", bias=False))
    params = holder_params(model)
    adam, muon = configure_optimizer(params, MUON, torch.device("cpu"))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adam = {id(p) for g in adam.param_groups for p in g["params"]}
    assert not in_muon & in_adam and in_muon | in_adam == {id(p) for p in params.values()}
    named = {id(p): n for n, p in params.items()}
    assert sorted(named[i] for i in in_muon) == sorted(muon_param_names(params))
    assert all(".blocks." in named[i] and params[named[i]].dim() == 2 for i in in_muon)
    assert len(in_muon) == 2 * 5  # per block: the fused qkv, the attention output, SwiGLU's gate, up and down
    for name in ("model.tok_emb.weight", "model.lm_head.weight", "model.blocks.0.attn.q_norm.weight"):
        if name in params:
            assert id(params[name]) in in_adam, name
    only_adam = configure_optimizer(params, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert len(only_adam) == 1 and isinstance(only_adam[0], torch.optim.AdamW)


@pytest.mark.parametrize("ns_dtype, tolerance", [(torch.bfloat16, 2e-3), (torch.float32, 1e-5)])
def test_newton_schulz_output_is_nearly_orthogonal_and_the_update_is_the_direct_one(ns_dtype, tolerance):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 32))  # tall: the lr is scaled by sqrt(96 / 32)
    grads = [torch.randn(96, 32) for _ in range(3)]
    opt = Muon([{"params": [w]}], lr=0.02, momentum=0.9, weight_decay=0.0, ns_dtype=ns_dtype)
    want, buf = w.detach().double().clone(), torch.zeros(96, 32, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g.double()  # torch keeps an EMA of the gradient; Nesterov looks one step ahead
        update = newton_schulz(0.1 * g.double() + 0.9 * buf)
        want -= 0.02 * math.sqrt(96 / 32) * update
        # The quintic trades exactness for speed: singular values land near 1, not on it (0.7-1.2 or so).
        s = torch.linalg.svdvals(update)
        assert 0.6 < float(s.min()) and float(s.max()) < 1.25
        u, _, vh = torch.linalg.svd(0.1 * g.double() + 0.9 * buf, full_matrices=False)
        cos = (update * (u @ vh)).sum() / (update.norm() * (u @ vh).norm())
        assert cos > 0.98  # it points along U V^T, the orthogonalised momentum
    torch.testing.assert_close(w.detach().double(), want, rtol=0, atol=tolerance * float(want.abs().max()))


@pytest.mark.parametrize("shape", [(48, 16), (16, 40)])
def test_bf16_iteration_is_torchs_muon_bit_for_bit(shape):
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(torch.randn(shape)) for _ in range(2))
    theirs.data.copy_(ours.data)
    kwargs = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    opts = [Muon([{"params": [ours]}], **kwargs), torch.optim.Muon([theirs], adjust_lr_fn="original", **kwargs)]
    for _ in range(3):
        g = torch.randn(shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(opts[0].state[ours]["momentum_buffer"], opts[1].state[theirs]["momentum_buffer"])


def test_muon_iterates_in_the_training_dtype():
    params = holder_params(GPT(ModelConfig.from_preset("tiny", vocab_size=100)))
    for dtype in (torch.float32, torch.bfloat16):
        _, muon = configure_optimizer(params, MUON, torch.device("cpu"), dtype)
        assert muon.ns_dtype == dtype


def test_schedule_scales_both_lrs_and_warms_muon_momentum_up():
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.95, muon_momentum_warmup=10,
                      max_steps=100, warmup_steps=10, lr_schedule="cosine")
    adam, muon = configure_optimizer(holder_params(GPT(ModelConfig.from_preset("tiny", vocab_size=100))), cfg,
                                     torch.device("cpu"))
    for step in (0, 5, 10, 60, 99):
        lr = schedule_optimizers([adam, muon], cfg, step)
        assert lr == cfg.lr_at(step)
        assert all(g["lr"] == lr for g in adam.param_groups)
        assert muon.param_groups[0]["lr"] == pytest.approx(lr * 20)
        assert muon.param_groups[0]["momentum"] == pytest.approx(
            MUON_START_MOMENTUM + min(step / 10, 1) * (0.95 - MUON_START_MOMENTUM))


def test_muon_trains_and_refuses_fsdp_and_a_resume_with_another_optimizer(tmp_path, capsys, dataset_dir):
    out = tmp_path / "m"
    common = ["--data", str(dataset_dir), "--preset", "tiny", "--set", "optimizer=muon", "--set", "batch_size=2",
              "--set", "eval_tokens=128", "--set", "eval_every=0"]
    code, _, err = run_cli(["train", "--out", str(out), *common, "--set", "parallel=fsdp", "--set", "max_steps=2"],
                           capsys)
    assert code == 2 and "FSDP" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train", "--out", str(out), *common, "--set", "max_steps=2"], capsys)
    assert code == 0, err
    saved = torch.load(train_state.latest(out) / "optimizer.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in saved["state"].values())  # Muon's state is saved
    assert any("exp_avg" in s for s in saved["state"].values())  # and AdamW's
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(out), "--resume",
                            "--set", "optimizer=adamw", "--set", "max_steps=4"], capsys)
    assert code == 2 and "optimizer adamw differs" in err


def test_sigkill_then_resume_with_muon_is_bitwise_equal(tmp_path, dataset_dir):
    args = [*COMMON, "--set", "optimizer=muon", "--set", "muon_momentum_warmup=40"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p_ref = leangpt(["--data", str(dataset_dir), "--out", str(ref), *args])
    p = leangpt(["--data", str(dataset_dir), "--out", str(killed), *args])
    wait_for_state(killed, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert train_state.read_state(train_state.latest(killed))["step"] < 60
    r = leangpt(["--data", str(dataset_dir), "--out", str(killed), "--resume"])
    assert r.wait(timeout=300) == 0, r.communicate()[1][-2000:]
    assert p_ref.wait(timeout=300) == 0, p_ref.communicate()[1][-2000:]
    a, b = weights(ref), weights(killed)
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"


def test_ddp_with_muon_equals_one_process(tmp_path, dataset_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    muon = ["--set", "optimizer=muon", "--set", "max_steps=4"]
    run(["--data", str(dataset_dir), "--out", str(one), *BASE, *muon, "--set", "grad_accum=2"])
    run(["--data", str(dataset_dir), "--out", str(two), *BASE, *muon, "--set", "parallel=ddp"], nproc=2)
    assert losses(two) == pytest.approx(losses(one), abs=1e-5) and len(losses(two)) == 4
