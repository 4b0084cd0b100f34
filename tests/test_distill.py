import json
import math

import pytest
import torch
import torch.nn.functional as F

from leangpt import train_state
from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.config import ModelConfig
from leangpt.data.tokenizer import TextTokenizer
from leangpt.distill import (IGNORE_INDEX, DistillConfig, DistillLoss, build_student, distill_loss,
                             every_other_layer, teacher_targets)
from leangpt.model import GPT
from leangpt.train import lm_loss
from tests.conftest import run_cli, write_corpus


def direct_loss(s, t, y, T, alpha, reverse=False):
    """The textbook formula, written out with explicit probabilities and Python loops over positions."""
    s, t = s.double(), t.double()
    total_kl, total_ce, n = 0.0, 0.0, 0
    for b in range(s.size(0)):
        for i in range(s.size(1)):
            if y[b, i] == IGNORE_INDEX:
                continue
            ps = torch.exp(s[b, i] / T) / torch.exp(s[b, i] / T).sum()
            pt = torch.exp(t[b, i] / T) / torch.exp(t[b, i] / T).sum()
            p, q = (ps, pt) if reverse else (pt, ps)
            total_kl += float((p * (p.log() - q.log())).sum())
            total_ce += float(-torch.log(torch.exp(s[b, i]) / torch.exp(s[b, i]).sum())[y[b, i]])
            n += 1
    return alpha * T * T * total_kl / n + (1 - alpha) * total_ce / n


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g) * 3
    t = torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(11, (2, 5), generator=g)
    return s, t, y


@pytest.mark.parametrize("T, alpha, reverse", [(2.0, 0.5, False), (1.0, 1.0, False), (4.0, 0.3, True), (0.5, 0.9, True)])
def test_loss_equals_direct_computation(logits, T, alpha, reverse):
    s, t, y = logits
    y = y.clone()
    y[1, 3] = IGNORE_INDEX  # masked positions carry no loss and do not count
    got = distill_loss(s, t, y, T, alpha, reverse)
    assert float(got) == pytest.approx(direct_loss(s, t, y, T, alpha, reverse), rel=1e-5)


def test_t_squared_scaling(logits):
    s, t, y = logits
    kl_only = [float(distill_loss(s, t, y, T, alpha=1.0)) / T**2 for T in (1.0, 3.0)]
    assert float(distill_loss(s, t, y, 3.0, alpha=1.0)) == pytest.approx(9 * kl_only[1], rel=1e-6)
    # Why T^2: the soft-target gradient shrinks like 1/T^2; the factor keeps it at the same scale as T grows.
    norms = []
    for T in (8.0, 16.0):
        s_ = (s - s.mean(-1, keepdim=True)).clone().requires_grad_(True)
        distill_loss(s_, t - t.mean(-1, keepdim=True), y, T, alpha=1.0).backward()
        norms.append(float(s_.grad.norm()))
    assert norms[1] == pytest.approx(norms[0], rel=0.1)


def test_alpha_zero_is_plain_cross_entropy(logits):
    s, t, y = logits
    assert torch.equal(distill_loss(s, t, y, 2.0, alpha=0.0), F.cross_entropy(s.flatten(0, 1), y.flatten()))
    assert float(distill_loss(s, s, y, 2.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-12)


def tiny_config(**kw):
    return ModelConfig.from_preset("tiny", vocab_size=97, **kw)


def test_alpha_zero_loss_fn_matches_train_loss():
    torch.manual_seed(0)
    teacher, student = GPT(tiny_config(n_layer=4)), GPT(tiny_config())
    x, y = torch.randint(97, (2, 16)), torch.randint(97, (2, 16))
    loss = DistillLoss(teacher, DistillConfig(alpha=0.0), student.config)(student, x, y)
    torch.testing.assert_close(loss, lm_loss(student, x, y))


def test_layer_init_copies_exactly_the_chosen_blocks():
    torch.manual_seed(0)
    teacher = GPT(tiny_config(n_layer=6)).eval()
    student, how = build_student(teacher, layers="0,2,5")
    assert how == {"init": "teacher_layers", "layers": [0, 2, 5]} and student.config.n_layer == 3
    tsd = teacher.state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("blocks."):
            _, k, rest = name.split(".", 2)
            expected = tsd[f"blocks.{[0, 2, 5][int(k)]}.{rest}"]
        else:
            expected = tsd[name]
        assert torch.equal(value, expected), name
    # A different choice of blocks gives a different model; all blocks in order give the teacher back.
    assert not torch.equal(build_student(teacher, layers="0,1,5")[0].blocks[1].mlp.fc.weight, student.blocks[1].mlp.fc.weight)
    full = build_student(teacher, layers="0,1,2,3,4,5")[0].eval()
    x = torch.randint(97, (2, 10))
    torch.testing.assert_close(full(x), teacher(x))


def test_layer_init_keeps_per_layer_widths_of_a_pruned_teacher():
    torch.manual_seed(0)
    teacher = GPT(tiny_config(n_layer=4, layer_n_head=[2, 1, 2, 1], layer_intermediate_size=[256, 64, 128, 32])).eval()
    student, how = build_student(teacher, layers="1,3")
    assert student.config.layer_n_head == [1, 1] and student.config.layer_intermediate_size == [64, 32]
    assert torch.equal(student.blocks[1].mlp.fc.weight, teacher.blocks[3].mlp.fc.weight)
    assert build_student(teacher)[1] == {"init": "teacher_layers", "layers": [0, 2]}


def test_default_and_preset_students():
    torch.manual_seed(0)
    teacher = GPT(tiny_config(n_layer=12))
    assert every_other_layer(12, 6) == [0, 2, 4, 6, 8, 10]  # DistilGPT2
    student, how = build_student(teacher)
    assert how["layers"] == [0, 2, 4, 6, 8, 10]
    assert torch.equal(student.blocks[3].attn.qkv.weight, teacher.blocks[6].attn.qkv.weight)
    wide, how = build_student(teacher, preset="small-cpu")  # other widths: random init, the teacher's vocabulary
    assert how == {"init": "random"} and wide.config.vocab_size == 97 and wide.config.n_embd == 384
    assert teacher_targets(12, 6, [0, 2, 4, 6, 8, 10]) == [1, 3, 5, 7, 9, 11] == teacher_targets(12, 6, None)


def test_student_config_file_over_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = GPT(tiny_config(n_layer=4))
    spec = tmp_path / "s.yaml"
    spec.write_text("n_layer: 2\n")  # same blocks, half the depth: every other teacher block
    student, how = build_student(teacher, config_file=spec)
    assert how == {"init": "teacher_layers", "layers": [0, 2]}
    spec.write_text("n_layer: 2\nn_embd: 32\n")  # narrower: the MLP width follows the student's n_embd
    student, how = build_student(teacher, config_file=spec)
    assert how == {"init": "random"} and student.config.intermediate_size == 128
    spec.write_text("n_layer: 6\n")  # deeper than the teacher: nothing to copy block for block
    assert build_student(teacher, config_file=spec)[1] == {"init": "random"}


def test_hidden_loss_with_projection_trains_the_projection():
    torch.manual_seed(0)
    teacher = GPT(tiny_config(n_layer=2))
    student = GPT(tiny_config(n_layer=1, n_embd=32))
    for which in ("final", "blocks"):
        fn = DistillLoss(teacher, DistillConfig(hidden_loss="cosine", hidden_layers=which), student.config)
        assert fn.projection is not None and fn.projection.weight.shape == (64, 32)
        x = torch.randint(97, (2, 8))
        fn(student, x, x).backward()
        assert fn.projection.weight.grad is not None and fn.projection.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, dataset_dir):
    """A 6-block teacher with the dataset's tokenizer (random weights: the tests check plumbing, not quality)."""
    tok = TextTokenizer.load(dataset_dir)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", n_layer=6, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                        bos_token_id=tok.eos_id))
    out = tmp_path_factory.mktemp("teacher") / "t6"
    out.mkdir()
    save_checkpoint(out, model, tok, {"kind": "test"})
    return out


def test_must_work_command(tmp_path, capsys, teacher_dir, dataset_dir):
    """The issue's command (fewer steps and a small batch to keep the suite fast)."""
    out = tmp_path / "student"
    code, stdout, err = run_cli(["distill", "--teacher", str(teacher_dir), "--data", str(dataset_dir), "--out", str(out),
                                 "--student-layers", "0,2,4", "--set", "max_steps=20", "--set", "batch_size=2",
                                 "--set", "block_size=16", "--set", "eval_every=0", "--set", "eval_tokens=256",
                                 "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["step"] == 20 and math.isfinite(result["val_loss"])
    student, _, meta = load_checkpoint(out)
    assert student.config.n_layer == 3 and meta["kind"] == "distill" and meta["student"]["layers"] == [0, 2, 4]
    assert meta["teacher"] == str(teacher_dir) and meta["distill"]["temperature"] == 2.0
    teacher = load_checkpoint(teacher_dir)[0]
    assert not torch.equal(student.blocks[1].mlp.fc.weight, teacher.blocks[2].mlp.fc.weight)  # trained from the copy


def test_alpha_zero_distill_equals_plain_training(tmp_path, teacher_dir, dataset_dir):
    """α = 0 with a random student is exactly `train` from scratch: same weights after the same steps."""
    from leangpt.distill import DistillSettings, distill
    from leangpt.train import TrainConfig, train

    common = dict(max_steps=3, batch_size=2, block_size=16, eval_every=0, eval_tokens=128)
    n_layer = {"n_layer": 2}
    spec = tmp_path / "student.yaml"
    spec.write_text(json.dumps(n_layer))
    distill(DistillSettings(teacher=teacher_dir, data=dataset_dir, out=tmp_path / "d", student_config=spec,
                            student_init="random", distill=DistillConfig(alpha=0.0), progress=False, **common))
    train(TrainConfig(preset="tiny", model=n_layer, **common), dataset_dir, tmp_path / "p", progress=False)
    a, b = load_checkpoint(tmp_path / "d")[0].state_dict(), load_checkpoint(tmp_path / "p")[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_resume_restores_student_and_projection(tmp_path, capsys, teacher_dir, dataset_dir):
    """3 steps + resume to 6 equals 6 steps straight, with a hidden-state loss through a learned projection."""
    spec = tmp_path / "narrow.yaml"
    spec.write_text("n_layer: 2\nn_embd: 32\n")
    base = ["distill", "--teacher", str(teacher_dir), "--data", str(dataset_dir), "--student-config", str(spec)]
    sets = [f"--set={kv}" for kv in ("batch_size=2", "block_size=16", "eval_every=0", "eval_tokens=128",
                                     "lr_schedule=constant", "warmup_steps=0", "distill.hidden_loss=mse")]
    assert run_cli([*base, "--out", str(tmp_path / "a"), *sets, "--set=max_steps=6"], capsys)[0] == 0
    assert run_cli([*base, "--out", str(tmp_path / "b"), *sets, "--set=max_steps=3"], capsys)[0] == 0
    code, _, err = run_cli(["distill", "--teacher", str(teacher_dir), "--data", str(dataset_dir), "--out",
                            str(tmp_path / "b"), "--resume", "--set=max_steps=6"], capsys)
    assert code == 0, err
    a, b = load_checkpoint(tmp_path / "a")[0].state_dict(), load_checkpoint(tmp_path / "b")[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert json.loads((tmp_path / "b" / "leangpt.json").read_text())["distill"]["hidden_loss"] == "mse"


def test_resume_on_other_data_with_the_same_tokenizer_is_refused(tmp_path, capsys, teacher_dir, dataset_dir):
    """train() makes the resume checks itself, so distill --resume gets the dataset check that train --resume makes."""
    from leangpt.data.prepare import PrepareSettings, prepare

    out = tmp_path / "s"
    base = ["distill", "--teacher", str(teacher_dir), "--out", str(out), "--set=batch_size=2", "--set=block_size=16",
            "--set=eval_every=0", "--set=eval_tokens=128"]
    assert run_cli([*base, "--data", str(dataset_dir), "--student-layers", "0,3", "--set=max_steps=2"], capsys)[0] == 0
    other = tmp_path / "other"
    prepare(PrepareSettings(source=[str(write_corpus(tmp_path / "c", n_docs=30, seed=5))], out=other,
                            tokenizer=teacher_dir, val_fraction=0.2, seed=0, filters_enabled=False))
    code, _, err = run_cli([*base, "--data", str(other), "--resume", "--set=max_steps=4"], capsys)
    assert code == 2 and "differs from the saved run" in err and len(err.strip().splitlines()) == 1
    assert [d.name for d in train_state.step_dirs(out)] == ["step-00000002"]
    code, stdout, err = run_cli([*base, "--data", str(dataset_dir), "--resume", "--set=max_steps=4", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 4, err
    assert load_checkpoint(out)[2]["student"]["layers"] == [0, 3]


def test_mismatched_tokenizer_or_vocab_is_refused(tmp_path, capsys, teacher_dir):
    from leangpt.data.prepare import PrepareSettings, prepare

    other = tmp_path / "other"
    prepare(PrepareSettings(source=[str(write_corpus(tmp_path / "c", n_docs=4, seed=3))], out=other, vocab_size=300,
                            filters_enabled=False))
    code, _, err = run_cli(["distill", "--teacher", str(teacher_dir), "--data", str(other), "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "teacher's tokenizer" in err and len(err.strip().splitlines()) == 1
    spec = tmp_path / "s.yaml"
    spec.write_text("vocab_size: 300\nn_layer: 1\n")
    torch.manual_seed(0)
    with pytest.raises(Exception, match="must share the tokenizer"):
        build_student(GPT(tiny_config()), config_file=spec)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--student-layers", "0,7"], "blocks 0..5"),
    (["--student-layers", "2,1"], "strictly increasing"),
    (["--student-layers", "a"], "comma-separated"),
    (["--student-preset", "small-cpu", "--student-init", "teacher"], "block shapes differ"),
    (["--set", "distill.alpha=2"], "distill.alpha"),
    (["--set", "distill.hidden_loss=l1"], "hidden_loss"),
    (["--set", "model.n_layer=2"], "drop preset / model"),
    (["--set", "compile=true", "--set", "distill.hidden_loss=cosine"], "compile=false"),
    (["--student-layers", "0,2", "--student-preset", "tiny"], "at most one of"),
    (["--student-preset", "huge"], "unknown preset"),
    (["--resume", "--student-layers", "0,2"], "drop --student-*"),
])
def test_bad_options_fail_cleanly(tmp_path, capsys, teacher_dir, dataset_dir, extra, message):
    out = tmp_path / "s"
    code, _, err = run_cli(["distill", "--teacher", str(teacher_dir), "--data", str(dataset_dir), "--out", str(out),
                            *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
