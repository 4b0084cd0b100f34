"""The architecture options beyond GPT-2 and llama (QK-norm, ReLU², parameter-free norms, a norm after the embedding,
logit softcap, explicit head_dim, zero-initialised projections) against transformers' qwen3 and nanochat, and the
KV-cache decode and the engine's compiled CPU step against a full forward."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import save_file

from leangpt import hf
from leangpt.checkpoint import load_model
from leangpt.config import ModelConfig
from leangpt.engine import Engine, Request
from leangpt.errors import UserError
from leangpt.model import GPT
from leangpt.sampling import SamplingConfig

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, tie_embeddings=False)
QWEN3 = {**LLAMA, "qk_norm": True}
NANOCHAT = {**LLAMA, "mlp": "relu2", "qk_norm": True, "norm_weight": False, "embed_norm": True, "logit_softcap": 15.0}

SAVED = {  # option mixes that are saved, and the transformers class that reads them
    "gpt2-zero-init": ({"zero_init_proj": True}, "GPT2LMHeadModel"),
    "llama-head-dim": ({**LLAMA, "n_head": 4, "head_dim": 8}, "LlamaForCausalLM"),
    "qwen3-gqa-untied": (QWEN3, "Qwen3ForCausalLM"),
    "qwen3-mha-tied": ({**QWEN3, "n_kv_head": 2, "tie_embeddings": True}, "Qwen3ForCausalLM"),
    "qwen3-head-dim-zero-init": ({**QWEN3, "n_head": 4, "n_kv_head": 2, "head_dim": 24, "zero_init_proj": True},
                                 "Qwen3ForCausalLM"),
    "nanochat-softcap": (NANOCHAT, "NanoChatForCausalLM"),
    "nanochat-no-cap-tied-head-dim": ({**NANOCHAT, "logit_softcap": None, "tie_embeddings": True, "n_head": 4,
                                       "n_kv_head": 2, "head_dim": 8}, "NanoChatForCausalLM"),
}


def randomize(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Weights far from their init, so that a norm weight left at one or a projection left at zero would show."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
    return model


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(ModelConfig.from_preset("tiny", vocab_size=300, **kw)).eval())


def write_hf_dir(model: GPT, directory) -> None:
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(model.config)))
    save_file(hf.to_hf_state_dict(model.config, model.state_dict()), str(directory / "model.safetensors"))


@pytest.mark.parametrize("variant", list(SAVED))
def test_saved_options_give_transformers_the_same_logits(tmp_path, variant):
    options, hf_class = SAVED[variant]
    model = tiny(**options)
    write_hf_dir(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == hf_class
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        theirs = ref(x).logits
        # These random weights give logits near 10, where fp32 products summed in another order differ by a
        # few ulps (2.4e-5 for llama-head-dim on an AVX2-only EPYC's kernels, 0 for the qwen3 mixes). The
        # default recipe's model is held to 1e-5 absolute in test_qwen3_downstream.
        torch.testing.assert_close(model(x), theirs, atol=3e-6 * float(theirs.abs().max()), rtol=0)
        torch.testing.assert_close(load_model(tmp_path)(x), model(x), atol=0, rtol=0)  # and back, exactly
    # Every option but the initialisation, which is not part of the saved model.
    assert load_model(tmp_path).config == dataclasses.replace(model.config, zero_init_proj=False)


def hf_random(model_class, config) -> nn.Module:
    torch.manual_seed(4)
    return randomize(model_class(config).eval())


QWEN3_DIRS = {  # transformers' own tiny Qwen3 models: head_dim unset (its default, 128), explicit, and tied
    "default-head-dim": dict(num_key_value_heads=2),
    "head-dim-16": dict(num_key_value_heads=1, head_dim=16),
    "tied-mha": dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, rope_theta=500.0),
}


@pytest.mark.parametrize("variant", list(QWEN3_DIRS))
def test_qwen3_dirs_written_by_transformers_round_trip(tmp_path, variant):
    kw = QWEN3_DIRS[variant]
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}} if "rope_theta" in kw else {}
    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                                   **rope, **kw)
    ref = hf_random(transformers.Qwen3ForCausalLM, cfg)
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert hf.hf_model_type(model.config) == "qwen3" and model.config.head_dim == cfg.head_dim
    again = assert_same_logits_and_saved_again(model, ref, tmp_path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "attention_bias"):
        assert getattr(again.config, key) == getattr(ref.config, key), key


def assert_same_logits_and_saved_again(model, ref, tmp_path):
    """leangpt's logits equal transformers'; saved again by leangpt, the directory holds the same tensors bit for
    bit. Returns the re-saved directory as transformers loads it."""
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)
    (tmp_path / "ours").mkdir()
    write_hf_dir(model, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    theirs, ours = ref.state_dict(), again.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    return again


def test_nanochat_dir_written_by_transformers_round_trips(tmp_path):
    cfg = transformers.NanoChatConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref = hf_random(transformers.NanoChatForCausalLM, cfg)
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert model.config.logit_softcap == 15.0 and not model.config.norm_weight and model.config.embed_norm
    assert_same_logits_and_saved_again(model, ref, tmp_path)


@pytest.mark.parametrize("options", [{"mlp": "relu2"}, {**LLAMA, "mlp": "relu2"}, {**QWEN3, "bias": True},
                                     {**QWEN3, "logit_softcap": 30.0}, {**NANOCHAT, "norm_weight": True},
                                     {**NANOCHAT, "embed_norm": False}, {"qk_norm": True}],
                         ids=["gpt2-relu2", "llama-relu2", "qwen3-bias", "qwen3-softcap", "nanochat-norm-weights",
                              "nanochat-no-embed-norm", "gpt2-qk-norm"])
def test_options_without_a_hugging_face_format_are_refused(tmp_path, options):
    model = tiny(**options)  # trains and runs; saving is what is refused
    assert model(torch.randint(0, 300, (1, 5))).shape == (1, 5, 300)
    with pytest.raises(UserError, match="no Hugging Face format"):
        write_hf_dir(model, tmp_path)


def test_unsupported_hugging_face_configs_are_user_errors():
    qwen3 = hf.config_to_hf(ModelConfig.from_preset("tiny", **QWEN3))
    with pytest.raises(UserError, match="sliding-window"):
        hf.config_from_hf({**qwen3, "use_sliding_window": True})
    with pytest.raises(UserError, match="attention_bias"):
        hf.config_from_hf({**qwen3, "attention_bias": True})
    with pytest.raises(UserError, match="activation"):
        hf.config_from_hf({**hf.config_to_hf(ModelConfig.from_preset("tiny", **NANOCHAT)), "hidden_act": "silu"})
    with pytest.raises(UserError, match="unsupported model_type"):
        hf.config_from_hf({**qwen3, "model_type": "qwen2"})


DECODED = {
    "qwen3": QWEN3,
    "qwen3-head-dim": {**QWEN3, "n_head": 4, "n_kv_head": 2, "head_dim": 24},
    "nanochat": NANOCHAT,
    "relu2-softcap-layernorm": {"mlp": "relu2", "logit_softcap": 2.0, "qk_norm": True, "norm_weight": False},
}


@pytest.mark.parametrize("variant", list(DECODED))
def test_kv_cache_decode_equals_full_forward(variant):
    model = tiny(**DECODED[variant])  # logits up to ~10: a different summation order moves them by ~1e-5
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 32)
        steps = [model(x[:, :7], torch.arange(7))]
        for t in range(7, 24):
            steps.append(model(x[:, t:t + 1], torch.tensor([t]), t + 1 if t % 2 else None))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
        # Per-row positions: row 1 a prompt of 4 tokens decoded at its own slots.
        model(x[:, :7], torch.arange(7).expand(2, 7))
        step = model(x[:, 7:8], torch.tensor([[7], [4]]))
        torch.testing.assert_close(step[0], full[0, 7:8], atol=1e-4, rtol=0)
        torch.testing.assert_close(step[1], model(torch.cat([x[1:, :4], x[1:, 7:8]], 1))[0, -1:], atol=1e-4, rtol=0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["qwen3", "nanochat"])
def test_compiled_decode_equals_full_forward(variant):
    # The engine's compiled CPU step (the written-out one-query attention, the multiply-and-sum linears) with
    # QK-norm, parameter-free norms, ReLU² and the softcap.
    model = tiny(**DECODED[variant])
    greedy = SamplingConfig(temperature=0)
    seq = [1, 2]
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    engine = Engine(model, compile=True, native=False)
    got = engine.generate([Request([1, 2], 6, greedy), Request([3], 9, greedy)])
    assert engine.compile_error is None and engine._compiled_one is not None
    assert got[0].tokens == seq[2:]
    with torch.inference_mode():
        engine.setup_cache(1, 16)
        model(torch.tensor([[1, 2, 3]]), torch.arange(3))
        tok, pos = torch.tensor([[4]]), torch.tensor([3])
        torch.testing.assert_close(engine.decode(tok, pos), model(torch.tensor([[1, 2, 3, 4]]))[:, -1],
                                   atol=1e-4, rtol=1e-4)


def test_parameter_free_norms_and_zero_init():
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=300, **NANOCHAT, zero_init_proj=True))
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "norm" in n]  # norms without weights: nothing to train or save
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    x = torch.randint(0, 300, (2, 9))
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0  # zero at the start, not stuck there
    model.eval().setup_cache(1, 16, torch.bfloat16)
    assert model.blocks[0].attn.kv_cache.k.dtype == torch.bfloat16


def test_config_options_default_to_todays_models_and_round_trip():
    old = {k: v for k, v in ModelConfig.from_preset("small-cpu").to_dict().items()
           if k not in ("head_dim", "qk_norm", "norm_weight", "embed_norm", "logit_softcap", "zero_init_proj")}
    assert ModelConfig.from_dict(old) == ModelConfig.from_preset("small-cpu")  # a config saved before the options
    cfg = ModelConfig.from_preset("tiny", **QWEN3, n_head=4, head_dim=24)
    assert cfg.to_dict()["head_dim"] == 24 and ModelConfig.from_dict(cfg.to_dict()) == cfg
    # A derived head_dim stays derived, so that overriding n_head re-derives it.
    assert ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "n_head": 4}).head_dim == 16
    for bad, match in (({"mlp": "relu"}, "relu2"), ({"logit_softcap": 0.0}, "logit_softcap"),
                       ({"pos": "rope", "head_dim": 7}, "head_dim")):
        with pytest.raises(UserError, match=match):
            ModelConfig.from_preset("tiny", **bad)


def test_small_cpu_qwen3_preset():
    cfg = ModelConfig.from_preset("small-cpu-qwen3", vocab_size=8192)
    small = ModelConfig.from_preset("small-cpu", vocab_size=8192)
    assert hf.hf_model_type(cfg) == "qwen3"
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size) == (small.n_layer, small.n_embd, small.n_head,
                                                                     small.block_size)
    # The same parameters in the blocks (SwiGLU's three matrices at 8/3 the width), plus the untied head.
    model, ref = GPT(cfg), GPT(small)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert blocks == pytest.approx(sum(p.numel() for p in ref.blocks.parameters()), rel=0.01)
    assert model.num_params() - blocks == 2 * 8192 * 384 + 384


@pytest.mark.parametrize("options", [{**QWEN3, "zero_init_proj": True}, NANOCHAT], ids=["qwen3", "nanochat"])
def test_trained_checkpoint_loads_in_transformers(dataset_dir, tmp_path, options, capsys):
    from conftest import run_cli

    sets = [a for k, v in options.items()
            for a in ("--set", f"model.{k}={v if isinstance(v, str) else json.dumps(v)}")]
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(tmp_path / "ckpt"), "--preset", "tiny",
                            "--max-steps", "3", "--set", "batch_size=4", "--set", "eval_every=0", *sets], capsys)
    assert code == 0, err
    model = load_model(tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)
    code, out, err = run_cli(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "The", "--max-new-tokens",
                              "4", "--seed", "0", "--json"], capsys)
    assert code == 0, err


def test_a_mix_without_a_format_fails_before_training(dataset_dir, tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(tmp_path / "ckpt"), "--preset",
                            "small-cpu-qwen3", "--set", "model.logit_softcap=15", "--max-steps", "1"], capsys)
    assert code == 2 and "no Hugging Face format" in err and len(err.strip().splitlines()) == 1
