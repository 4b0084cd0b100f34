import json

import pytest
import torch
import transformers

from leangpt import hf
from leangpt.checkpoint import load_checkpoint, load_model
from leangpt.config import ModelConfig
from leangpt.hessian import inverse_cholesky
from leangpt.model import GPT
from leangpt.pruning import structured, unstructured
from leangpt.pruning.masks import global_masks, nm_mask, parse_pattern, row_mask
from tests.conftest import run_cli

LLAMA_GQA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, n_head=4, n_kv_head=2)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", vocab_size=300, **kw)).eval()


def random_tokens(n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(1))


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert (groups <= n).all(), "an N:M group keeps more than N weights"


# ---------------------------------------------------------------- unstructured and N:M

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_per_layer(method):
    model = tiny()
    tokens = random_tokens()
    if method == "magnitude":
        masks = unstructured.magnitude(model, 0.3)
    else:
        masks = getattr(unstructured, method)(model, tokens, 0.3)
    params = dict(model.named_parameters())
    assert set(masks) == {f"{n}.weight" for n in unstructured.block_linears(model)}
    for name, keep in masks.items():
        w = params[name]
        expected = round(0.3 * w.shape[1]) * w.shape[0] if method == "wanda" else round(0.3 * w.numel())
        assert int((~keep).sum()) == expected, name
        assert torch.equal(w == 0, ~keep), f"{name}: zeros differ from the mask"
    assert model.tok_emb.weight.ne(0).all()  # embeddings and head stay dense


def test_global_magnitude_total_is_exact_and_uneven():
    model = tiny()
    masks = unstructured.magnitude(model, 0.5, scope="global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    per_layer = {n: float((~m).float().mean()) for n, m in masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # global ranking gives uneven layers
    scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.5, 4.0])}
    assert global_masks(scores, 0.4)["a"].tolist() == [True, False, True]
    assert global_masks(scores, 0.4)["b"].tolist() == [False, True]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_holds_in_every_group(method, pattern):
    n, m = parse_pattern(pattern)
    model = tiny()
    if method == "magnitude":
        masks = unstructured.magnitude(model, 0.5, (n, m))
    else:
        masks = getattr(unstructured, method)(model, random_tokens(), 0.5, (n, m))
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert (keep.reshape(keep.shape[0], -1, m).sum(-1) == n).all(), name
        assert_nm(params[name], n, m)


def test_nm_mask_keeps_largest_and_rejects_bad_shapes():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    with pytest.raises(Exception, match="multiple of"):
        nm_mask(torch.ones(2, 6), 2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(Exception, match="pattern"):
            parse_pattern(bad)


def test_wanda_mask_equals_direct_computation():
    model = tiny()
    reference = tiny()
    tokens = random_tokens()
    masks = unstructured.wanda(model, tokens, 0.5)
    # Direct: inputs of block 0's layers on the unpruned model, score |W|·‖X‖, drop the lowest half per row.
    inputs = {}

    def record(key):
        def hook(mod, inp, out):
            inputs[key] = inp[0].reshape(-1, inp[0].shape[-1])
        return hook

    block = reference.blocks[0]
    hooks = [block.get_submodule(key).register_forward_hook(record(key)) for key in ("attn.qkv", "mlp.fc", "mlp.proj")]
    with torch.no_grad():
        reference(tokens)
    for h in hooks:
        h.remove()
    for key, x in inputs.items():
        w = reference.blocks[0].get_submodule(key).weight
        score = w.abs() * x.norm(dim=0)[None, :]
        order = score.argsort(dim=1)
        expected = torch.ones_like(w, dtype=torch.bool)
        expected.scatter_(1, order[:, : w.shape[1] // 2], False)
        assert torch.equal(masks[f"blocks.0.{key}.weight"], expected), key


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    mix = torch.randn(64, 64)
    x = torch.randn(2048, 64) @ mix * torch.linspace(0.1, 3, 64)  # correlated inputs of uneven scale
    w = torch.randn(48, 64)
    hessian = 2 / len(x) * x.t() @ x
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        wp = w.clone()
        if name == "sparsegpt":
            keep = unstructured.sparsegpt_layer(wp, hessian, 0.5)
        else:
            score = wp.abs() * (x.norm(dim=0)[None, :] if name == "wanda" else 1)
            keep = row_mask(score, 0.5)
            wp = wp * keep
        assert int((~keep).sum()) == w.numel() // 2 and torch.equal(wp == 0, ~keep)
        errors[name] = float((x @ (w - wp).t()).pow(2).mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_inverse_cholesky_factorises_the_damped_inverse():
    x = torch.randn(200, 16)
    h = 2 / 200 * x.t() @ x
    h[3, :] = h[:, 3] = 0  # a dead input
    u = inverse_cholesky(h, damp=0.01)
    fixed = h.clone()
    fixed[3, 3] = 1
    lam = 0.01 * torch.diagonal(fixed).mean()
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(fixed + lam * torch.eye(16)), atol=1e-4, rtol=1e-4)
    assert torch.equal(u, u.triu())


# ---------------------------------------------------------------- structured

@pytest.mark.parametrize("options", [{}, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_removing_zeroed_heads_and_neurons_leaves_logits_unchanged(options):
    model = tiny(**options)
    c = model.config
    group_size = c.n_head // c.n_kv_head
    with torch.no_grad():  # zero KV group 0 of block 0 and neurons 0..9 of block 1 in the output projections
        model.blocks[0].attn.proj.weight[:, : group_size * c.head_dim] = 0
        model.blocks[1].mlp.proj.weight[:, :10] = 0
    groups = [torch.arange(1, c.n_kv_head), torch.arange(c.n_kv_head)]
    neurons = [torch.arange(c.intermediate_size), torch.arange(10, c.intermediate_size)]
    small = structured.shrink(model, structured.Plan(groups, neurons))
    assert small.config.layer_n_head == [c.n_head - group_size, c.n_head]
    assert small.config.layer_intermediate_size == [c.intermediate_size, c.intermediate_size - 10]
    assert small.num_params() < model.num_params()
    x = random_tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
        small.setup_cache(2, 24)  # the KV cache follows the per-layer head counts
        steps = [small(x[:, :5], torch.arange(5))] + [small(x[:, t:t + 1], torch.tensor([t])) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), model(x), atol=1e-5, rtol=0)


def test_structured_plan_counts_and_zeroed_units():
    model = tiny(**{**LLAMA_GQA, "n_head": 4, "n_kv_head": 4})
    plan = structured.plan_structured(model, random_tokens(), heads=0.25, neurons=0.5)
    assert [len(g) for g in plan.groups] == [3, 3] and [len(n) for n in plan.neurons] == [128, 128]
    glob = structured.plan_structured(tiny(), random_tokens(), heads=0.5, neurons=0.5, scope="global")
    assert sum(len(g) for g in glob.groups) == 2 and all(len(g) >= 1 for g in glob.groups)
    assert sum(len(n) for n in glob.neurons) == 256
    with pytest.raises(Exception, match="single KV group"):
        structured.plan_structured(tiny(**{**LLAMA_GQA, "n_kv_head": 1}), random_tokens(), heads=0.5, neurons=0)


def test_uniform_llama_shrink_stays_hugging_face_loadable(tmp_path):
    model = tiny(**LLAMA_GQA)
    plan = structured.plan_structured(model, random_tokens(), heads=0.5, neurons=0.25)
    small = structured.shrink(model, plan)
    assert small.config.layer_n_head == [2, 2] and small.config.intermediate_size == 192
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(small.config)))
    from safetensors.torch import save_file
    save_file(hf.to_hf_state_dict(small.config, small.state_dict()), str(tmp_path / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = random_tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, small(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(tmp_path)(x), small(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the command

def test_cli_wanda_and_sparsegpt_24_reload_and_generate(tiny_checkpoint, dataset_dir, tmp_path, capsys):
    common = ["--model", str(tiny_checkpoint), "--calib-data", str(dataset_dir), "--calib-samples", "8", "--json"]
    code, out, err = run_cli(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w"), *common], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["sparsity"] == pytest.approx(0.5)
    code, out, err = run_cli(["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "2:4",
                              "--out", str(tmp_path / "s24"), *common], capsys)
    assert code == 0, err
    model, _, meta = load_checkpoint(tmp_path / "s24")
    assert meta["kind"] == "prune" and meta["method"] == "sparsegpt"
    for name, lin in unstructured.block_linears(model).items():
        assert_nm(lin.weight, 2, 4)
    code, out, err = run_cli(["generate", "--model", str(tmp_path / "s24"), "--prompt", "The king",
                              "--max-new-tokens", "8", "--seed", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["tokens"] > 0
    code, out, _ = run_cli(["eval", "--model", str(tmp_path / "w"), "--data", str(dataset_dir), "--json"], capsys)
    assert code == 0 and json.loads(out)["perplexity"] > 1


def test_cli_structured_with_recovery_reloads_smaller(tiny_checkpoint, dataset_dir, tmp_path, capsys):
    out_dir = tmp_path / "s"
    code, out, err = run_cli(["prune", "--model", str(tiny_checkpoint), "--method", "structured", "--heads", "0.5",
                              "--neurons", "0.5", "--calib-data", str(dataset_dir), "--calib-samples", "8",
                              "--recover-steps", "3", "--set", "batch_size=4", "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["heads"] == [1, 1] and result["neurons"] == [128, 128]
    assert result["params"] < result["params_before"] and "val_perplexity" in result["recovery"]
    model, _, meta = load_checkpoint(out_dir)
    assert model.config.layer_n_head == [1, 1] and model.config.intermediate_size == 128
    assert meta["kind"] == "prune" and meta["recovery"]["steps"] == 3
    code, out, _ = run_cli(["generate", "--model", str(out_dir), "--prompt", "The", "--max-new-tokens", "5",
                            "--seed", "0", "--json"], capsys)
    assert code == 0
    code, _, err = run_cli(["quantize", "--model", str(out_dir), "--method", "int8", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["generate", "--model", str(tmp_path / "q"), "--prompt", "The", "--max-new-tokens", "5",
                              "--seed", "0", "--json"], capsys)
    assert code == 0, err


def test_cli_recovery_keeps_the_masks(tiny_checkpoint, dataset_dir, tmp_path, capsys):
    code, out, err = run_cli(["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--pattern", "2:4",
                              "--calib-data", str(dataset_dir), "--recover-steps", "3", "--recover-loss", "distill",
                              "--set", "batch_size=4", "--set", "lr=0.01", "--out", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["recovery"]["loss"] == "distill"
    model = load_model(tmp_path / "m")
    for lin in unstructured.block_linears(model).values():
        assert_nm(lin.weight, 2, 4)
        assert float((lin.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_recovery_settings_take_plain_and_prefixed_keys():
    from leangpt import cli, prune

    settings, _ = cli.parse(prune.build_parser(), [
        "--model", "m", "--out", "o", "--method", "magnitude", "--pattern", "2:4", "--calib-data", "d",
        "--recover-steps", "7", "--device", "cpu", "--seed", "3", "--set", "lr=0.01", "--set", "batch_size=4",
        "--set", "recovery.seed=5"])
    assert settings.validate() == (0.5, (2, 4))  # the sparsity --pattern implies
    assert (settings.seed, settings.recovery.seed) == (3, 5)  # names prune has too take the recovery. prefix
    rcfg = settings.recovery_config()
    assert (rcfg.lr, rcfg.batch_size, rcfg.max_steps, rcfg.device) == (0.01, 4, 7, "cpu")
    assert prune.PruneSettings().recovery == prune.recovery_defaults()


def test_library_call_writes_the_checkpoint(tiny_checkpoint, tmp_path):
    from leangpt.prune import PruneSettings, prune

    result = prune(PruneSettings(model=tiny_checkpoint, out=tmp_path / "m", method="magnitude", sparsity=0.25))
    assert result["checkpoint"] == str(tmp_path / "m") and result["sparsity"] == pytest.approx(0.25)
    assert load_checkpoint(tmp_path / "m")[2]["target_sparsity"] == 0.25 and "recovery" not in result


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--sparsity", "0.5"], "needs --calib-data"),
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity must be in"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.3"], "means sparsity 0.5"),
    (["--method", "magnitude"], "needs --sparsity"),
    (["--method", "structured", "--sparsity", "0.5"], "takes --heads"),
    (["--method", "wanda", "--sparsity", "0.5", "--scope", "global", "--calib-data", "x"], "prunes per layer"),
    (["--method", "structured", "--heads", "0.5", "--calib-data", "x", "--recover-steps", "2", "--set", "lr=0"],
     "lr must be > 0"),
    (["--method", "magnitude", "--sparsity", "0.5", "--set", "recovery.lr=fast"], "bad value for recovery.lr"),
])
def test_cli_rejects_bad_options(tiny_checkpoint, tmp_path, capsys, args, message):
    code, _, err = run_cli(["prune", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()
