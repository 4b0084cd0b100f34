import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from leangpt import hf
from leangpt.checkpoint import load_model
from leangpt.config import PRESETS, ModelConfig
from leangpt.errors import UserError
from leangpt.model import GPT, attend_one_query

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, tie_embeddings=False)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", vocab_size=300, **kw)).eval()


def write_hf_dir(model: GPT, directory) -> None:
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(model.config)))
    save_file(hf.to_hf_state_dict(model.config, model.state_dict()), str(directory / "model.safetensors"))


@pytest.mark.parametrize("options", [{}, LLAMA, {**LLAMA, "tie_embeddings": True, "bias": True, "n_kv_head": 2}],
                         ids=["gpt2", "llama-gqa-untied", "llama-mha-tied-bias"])
def test_leangpt_to_transformers_same_logits(tmp_path, options):
    model = tiny(**options)
    write_hf_dir(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == ("GPT2LMHeadModel" if not options else "LlamaForCausalLM")
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)


def test_transformers_gpt2_to_leangpt_same_logits(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=320, n_positions=48, n_embd=64, n_layer=2, n_head=4)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    x = torch.randint(0, 320, (3, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)


def test_transformers_llama_to_leangpt_same_logits(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_decode_equals_full_forward(options):
    model = tiny(**options)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 32)
        steps = [model(x[:, :7], torch.arange(7))]
        for t in range(7, 24):
            # Odd steps attend to just the slots written so far (kv_len), even ones to the whole cache.
            steps.append(model(x[:, t:t + 1], torch.tensor([t]), t + 1 if t % 2 else None))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_presets_have_intended_sizes():
    assert GPT(ModelConfig.from_preset("tiny", vocab_size=2048)).num_params() < 1_000_000
    small = GPT(ModelConfig.from_preset("small-cpu", vocab_size=8192)).num_params()
    assert 8e6 < small < 12e6
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        assert c.n_embd % 64 == 0
    gpt2 = ModelConfig.from_preset("gpt2")
    n = 12 * gpt2.n_layer * gpt2.n_embd**2  # the published 124M GPT-2
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024) and n > 80e6


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=2048, n_layer=8, n_embd=256, n_head=4))
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight


def test_bad_model_configs_are_user_errors():
    with pytest.raises(UserError, match="unknown preset"):
        ModelConfig.from_preset("nope")
    with pytest.raises(UserError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="no Hugging Face format"):
        hf.hf_model_type(ModelConfig(norm="rmsnorm"))


@pytest.mark.parametrize("n_head,n_kv_head,per_row", [(4, 4, False), (4, 2, True), (6, 1, True)])
def test_one_query_attention_equals_sdpa(n_head, n_kv_head, per_row):
    # The compiled CPU decode step's written-out attention, against SDPA with grouped-query heads and masks.
    torch.manual_seed(0)
    B, L, D = 3, 20, 16
    q = torch.randn(B, n_head, 1, D)
    k, v = torch.randn(B, n_kv_head, L, D), torch.randn(B, n_kv_head, L, D)
    pos = torch.tensor([[4], [19], [0]]) if per_row else torch.tensor([11])
    mask = torch.arange(L) <= pos[..., None]  # as GPT.forward_hidden builds it
    if per_row:
        mask = mask.unsqueeze(1)  # (B, 1, 1, L)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           enable_gqa=n_kv_head != n_head)
    torch.testing.assert_close(attend_one_query(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
