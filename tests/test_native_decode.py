"""leangpt's C++ decode step (native_decode.py, quant/native_decoder.cpp) against the model's own forward."""

import pytest
import torch
import torch.nn as nn

from leangpt.config import ModelConfig
from leangpt.engine import Engine, Request
from leangpt.model import GPT
from leangpt.native_decode import NativeDecoder, unsupported
from leangpt.pruning import structured
from leangpt.quant import native
from leangpt.quant.formats import Scheme, quantize_rtn
from leangpt.quant.kernels import KERNELS
from leangpt.quant.model import swap_embedding, swap_linears, target_layers
from leangpt.sampling import SamplingConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not native.available(), reason="leangpt's C++ kernels cannot be built here")]

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, tie_embeddings=False)
QWEN3 = {**LLAMA, "qk_norm": True}
CONFIGS = {
    "gpt2": {},  # learned positions, biases, LayerNorm, GELU, tied head
    "llama-gqa": LLAMA,
    "qwen3-head-dim": {**QWEN3, "n_head": 4, "n_kv_head": 2, "head_dim": 24},
    "nanochat": {**QWEN3, "mlp": "relu2", "norm_weight": False, "embed_norm": True, "logit_softcap": 15.0},
    "odd-widths": {"n_embd": 40, "n_head": 5, "vocab_size": 301},  # rows and inputs off the 8-row blocks
    "head-dim-12": {**QWEN3, "n_head": 2, "head_dim": 12},  # attention without 8-lane vectors
    "head-dim-80": {**LLAMA, "n_head": 2, "n_kv_head": 2, "head_dim": 80},  # values in 64 + 16 lanes
}
GREEDY = SamplingConfig(temperature=0)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", **{"vocab_size": 300, **kw})).eval()
    with torch.no_grad():  # sharper distributions than the init's, and non-trivial norms
        for name, p in model.named_parameters():
            p.mul_(3) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model


def position_errors(model: GPT, tokens: int = 24, prompt: int = 5) -> list[float]:
    """|C++ step logits - full forward logits| at each decoded position, largest, over the largest logit."""
    idx = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        want = model(idx)[0]  # (T, V), no cache
        model.setup_cache(1, tokens)
        model(idx[:, :prompt], torch.arange(prompt), prompt)
        errors = []
        for t in range(prompt, tokens):
            got = decoder.step(idx[:, t:t + 1], torch.tensor([t]))
            assert got.shape == (1, model.config.vocab_size)
            errors.append(float((got[0] - want[t]).abs().max() / want.abs().max()))
    return errors


def step_errors(model: GPT, tokens: int = 24, prompt: int = 5) -> float:
    """Largest |C++ step logits - full forward logits| over the decoded positions."""
    return max(position_errors(model, tokens, prompt))


def rows_errors(model: GPT, rows: int, tokens: int = 20, every: bool = False) -> float | list[float]:
    """Largest |C++ step logits - full forward logits| (with `every`, each row's at each step) over several rows
    decoded together, each from its own prompt length, so at its own position (and its own KV-cache row)."""
    idx = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(3))
    starts = [4 + (3 * r) % 7 for r in range(rows)]  # 4..10
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        want = model(idx)  # (B, T, V), no cache
        model.setup_cache(rows, tokens)
        P = max(starts)
        model(idx[:, :P], torch.arange(P), P)
        errors = []
        for t in range(tokens - P):
            pos = torch.tensor(starts)[:, None] + t  # (B, 1)
            got = decoder.step(idx.gather(1, pos), pos)
            assert got.shape == (rows, model.config.vocab_size)
            expected = want[torch.arange(rows), pos[:, 0]]
            errors += ((got - expected).abs().amax(1) / want.abs().max()).tolist()
    return errors if every else max(errors)


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_the_step_equals_the_full_forward(options):
    model = tiny(**options)
    assert unsupported(model) is None
    assert step_errors(model) < 1e-5


@pytest.mark.parametrize("rows", [2, 3, 7, 9])  # groups of 4, 2 and 1 input rows; 9: int4 dequantizes
@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
def test_several_rows_at_their_own_positions_equal_the_full_forward(rows, weights):
    model = tiny(**QWEN3)
    if weights != "float":
        model = quantized(model, 8 if weights == "int8" else 4, 32)
    assert rows_errors(model, rows) < 1e-5


@pytest.mark.parametrize("options", [CONFIGS["gpt2"], CONFIGS["odd-widths"], CONFIGS["nanochat"]],
                         ids=["gpt2", "odd-widths", "nanochat"])
def test_several_rows_of_other_architectures(options):
    torch.set_num_threads(2)
    assert rows_errors(tiny(**options), 5) < 1e-5


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_prompts_of_several_tokens_per_row_fill_the_cache_as_the_model_does(weights):
    # forward(): several tokens of one cache row in one step (a prompt, a draft to verify), in two chunks, the
    # second attending to the first's keys and to its own; rows from first_row on.
    torch.set_num_threads(2)
    model = tiny(**QWEN3)
    if weights == "int4":
        model = quantized(model, 4, 32)
    idx = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(4))
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        want = model(idx)  # (2, 14, V)
        model.setup_cache(3, 16)
        assert decoder.forward(idx[:, :6], torch.arange(6), first_row=1).shape == (0, 300)  # the cache only
        every = decoder.forward(idx[:, 6:], torch.arange(6, 14).expand(2, 8), first_row=1,
                                logit_items=torch.arange(16))
        assert float((every - want[:, 6:].reshape(16, -1)).abs().max()) < 1e-4 * float(want.abs().max())
        # A prompt's last logits of each row, then a decode step on the keys that forward() wrote.
        model.setup_cache(2, 16)
        last = decoder.forward(idx[:, :13], torch.arange(13), logit_items=torch.tensor([12, 25]))
        torch.testing.assert_close(last, want[:, 12], atol=1e-4 * float(want.abs().max()), rtol=0)
        got = decoder.step(idx[:, 13:], torch.tensor([13]))
        torch.testing.assert_close(got, want[:, 13], atol=1e-4 * float(want.abs().max()), rtol=0)


def test_a_long_cache():
    # Softmax over up to 250 positions: the vectorised exp over many 8-lane blocks and a tail.
    assert step_errors(tiny(**{**LLAMA, "block_size": 256}), tokens=251, prompt=3) < 1e-5


def test_two_threads_split_the_rows_and_heads_as_one_does():
    model = tiny(**QWEN3)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    assert step_errors(model) < 1e-5


def test_structurally_pruned_widths():
    model = tiny(**{**LLAMA, "n_head": 4, "n_kv_head": 2})
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    small = structured.shrink(model, structured.plan_structured(model, tokens, heads=0.5, neurons=0.3))
    widths = {(b.attn.n_head, b.mlp.fc.out_features) for b in small.blocks}
    assert all(h < 4 and f < model.blocks[0].mlp.fc.out_features for h, f in widths)
    assert step_errors(small.eval()) < 1e-5


def quantized(model: GPT, bits: int, group: int = 64, embedding: bool = False, activations: str = "float") -> GPT:
    """`model` with every linear (head included) on leangpt's native kernel, optionally its table too."""
    scheme = Scheme(8, None, activations) if bits == 8 else Scheme(4, group, activations)
    kernel = "native-int8" if bits == 8 else "native-int4"
    names = target_layers(model, include_head=not (embedding and model.config.tie_embeddings))
    qweights = {n: quantize_rtn(model.get_submodule(n).weight, scheme) for n in names}
    if embedding:
        swap_embedding(model, quantize_rtn(model.tok_emb.weight, scheme), torch.device("cpu"), kernel)
    swap_linears(model, qweights, torch.device("cpu"), kernel)
    assert all(type(m) is KERNELS[kernel] for m in model.modules() if hasattr(m, "kernel"))
    return model.eval()


@pytest.mark.parametrize("bits,group,options", [
    (8, 0, {}), (8, 0, LLAMA), (4, 32, {}), (4, 64, QWEN3), (4, 128, LLAMA),
    (4, 32, CONFIGS["odd-widths"]),  # 40 inputs: one whole group and one padded with zero inputs
], ids=["int8-gpt2", "int8-llama", "int4-g32-gpt2", "int4-g64-qwen3", "int4-g128-llama", "int4-g32-odd"])
def test_quantized_layers_equal_their_own_forward(bits, group, options):
    # The C++ step reads the same stored integers as the layers' own kernels: float rounding apart, equal.
    model = quantized(tiny(**options), bits, group)
    assert unsupported(model) is None
    assert step_errors(model) < 1e-5


@pytest.mark.parametrize("bits,group,options", [
    (4, 32, {}), (4, 64, QWEN3), (4, 128, LLAMA), (4, 32, CONFIGS["odd-widths"]),
    (8, 0, {}), (8, 0, QWEN3), (8, 0, CONFIGS["odd-widths"]),  # odd widths: inputs past the whole 32s
], ids=["int4-g32-gpt2", "int4-g64-qwen3", "int4-g128-llama", "int4-g32-odd", "int8-gpt2", "int8-qwen3", "int8-odd"])
def test_int8_activations_equal_the_layers_own_forward(bits, group, options, products):
    # The step's integer products round their inputs as the layers do (round_activations), so the logits are
    # equal up to float rounding, except where that rounding tips an input across a rounding boundary (then by
    # one step of its grid): at most a few positions, by far less than float activations would give. On a VNNI
    # machine both its products and AVX2's.
    model = quantized(tiny(**options), bits, group, activations="int8")
    assert unsupported(model) is None
    errors = position_errors(model)
    assert sorted(errors)[len(errors) // 2] < 1e-4 and max(errors) < 0.03
    for rows in (3, 7):  # several rows: integer products for groups of 4 and 2 input rows, then single rows
        errors = rows_errors(model, rows, every=True)  # (the full forward of 7 rows against that of each row
        # alone: up to 0.015, its own float rounding across a boundary of one row's grid)
        assert sorted(errors)[len(errors) // 2] < 1e-4 and max(errors) < 0.03


@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_table_is_looked_up_by_the_model(tied):
    model = quantized(tiny(**{**LLAMA, "tie_embeddings": tied}), 8, embedding=True)
    decoder = NativeDecoder(model)
    assert not decoder.float_table and unsupported(model) is None
    assert step_errors(model) < 1e-5


def test_prompts_of_quantized_models_take_the_step_up_to_its_larger_limit():
    # Quantized layers keep the C++ step ahead of the Python forward for whole prompts (NativeDecoder's comment),
    # float layers only up to max_rows tokens.
    model = quantized(tiny(**QWEN3), 8)
    assert NativeDecoder(model).max_rows == NativeDecoder.quantized_max_rows > NativeDecoder.max_rows
    assert NativeDecoder(tiny(**QWEN3)).max_rows == NativeDecoder.max_rows
    gen = torch.Generator().manual_seed(2)
    requests = [Request(torch.randint(0, 256, (n,), generator=gen).tolist(), 5, GREEDY) for n in (40, 33, 47)]
    engine = Engine(model)
    assert engine.native_takes(40 + 33 + 47) and not engine.native_takes(NativeDecoder.quantized_max_rows + 1)
    got, want = engine.generate(requests), Engine(model, native=False).generate(requests)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_the_engine_decodes_one_row_by_the_step_and_equals_its_python_step():
    model = tiny(**QWEN3)
    requests = [Request([1, 2, 3], 12, GREEDY)]
    python = Engine(model, native=False)
    want = python.generate(requests)
    assert python.native is None
    engine = Engine(model)
    assert engine.native is not None
    for _ in range(2):  # a second generation has a new cache, which the step must read
        got = engine.generate(requests)
        assert got[0].tokens == want[0].tokens
        assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-4)
    # Several rows, of different prompt lengths, take the C++ step too; more than max_rows the Python step.
    rows = [Request([1, 2, 3], 6, GREEDY), Request([4], 9, GREEDY), Request([5, 6], 7, GREEDY)]
    want = python.generate(rows)
    assert engine.decode_step(3) == "c++"
    for max_rows in (NativeDecoder.max_rows, 2):
        engine.native.max_rows = max_rows
        got = engine.generate(rows)
        assert [c.tokens for c in got] == [c.tokens for c in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert engine.decode_step(3) == "eager" and engine.decode_step(2) == "c++"


def test_what_the_step_does_not_cover_says_why():
    model = tiny()
    assert "not float32" in unsupported(tiny().to(torch.bfloat16))
    assert "is not leangpt's GPT" in unsupported(nn.Linear(2, 2))
    model.blocks[0].mlp.fc = KERNELS["reference"](quantize_rtn(model.blocks[0].mlp.fc.weight, Scheme(8)),
                                                  model.blocks[0].mlp.fc.bias, torch.device("cpu"))
    assert unsupported(model) == "ReferenceLinear layers have no C++ decode step"
    assert Engine(model).native is None  # and the engine decodes it in Python
    model = tiny()
    decoder = NativeDecoder(model)
    with pytest.raises(RuntimeError, match="setup_cache"):
        decoder.step(torch.tensor([[1]]), torch.tensor([0]))
    model.setup_cache(1, 8)
    with pytest.raises(RuntimeError, match=r"cache row 1 is outside the KV cache \(1 rows\)"):
        decoder.step(torch.tensor([[1], [2]]), torch.tensor([0]))
