"""The generation engine against slow, obviously-correct references: full forwards without a cache, each
prompt alone, Hugging Face's logits processors, and the exact distribution for the samplers."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import transformers.generation.logits_process as hf_lp

from leangpt.config import ModelConfig
from leangpt.cpu_linear import DecodeLinear, use_decode_linears
from leangpt.engine import Engine, Request
from leangpt.errors import UserError
from leangpt.model import GPT
from leangpt.quant import native
from leangpt.sampling import argmax, Sampler, SamplingConfig, token_logprobs

GREEDY = SamplingConfig(temperature=0)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, tie_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=300, **kw)).eval()
    # Larger weights than GPT-2's init make sharper distributions, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


class WeightOnlyInt8Linear(nn.Module):
    """gpt-fast's drop-in quantized linear: int8 weights, one scale per output channel, no float weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qweight.float() * self.scale, self.bias)


def swap_linears(model: nn.Module, make) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, make(child))
    return model


VARIANTS = {
    "gpt2": lambda: tiny(),
    "llama-gqa": lambda: tiny(**LLAMA),
    "pruned-widths": lambda: tiny(n_head=4, layer_n_head=[4, 2], layer_intermediate_size=[256, 96]),
    "quantized-int8": lambda: swap_linears(tiny(), WeightOnlyInt8Linear),
}


@torch.no_grad()
def reference_greedy(model: nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """A full forward over the whole sequence for every new token: no cache at all."""
    seq, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        tok = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        seq.append(tok)
    return seq[len(prompt):], lps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_forward_for_every_variant(variant):
    model = VARIANTS[variant]()
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, ref_lps = reference_greedy(model, prompt, 20)
    [c] = Engine(model).generate([Request(prompt, 20, GREEDY)])
    assert c.tokens == ref_tokens and c.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref_lps), atol=1e-4, rtol=0)


def test_dynamic_int8_kernels_run_through_the_engine():
    # FBGEMM's dynamic int8 Linear quantizes activations per call, so only shapes and validity are checked.
    with pytest.warns(Warning):
        model = torch.ao.quantization.quantize_dynamic(tiny(), {nn.Linear}, dtype=torch.qint8)
    [c] = Engine(model).generate([Request([1, 2, 3], 8, SamplingConfig(temperature=1.0), seed=0)])
    assert len(c.tokens) == 8 and all(0 <= t < 300 for t in c.tokens)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_batch_of_different_lengths_equals_each_prompt_alone(variant):
    model = VARIANTS[variant]()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    sampled = SamplingConfig(temperature=0.9, top_k=50)
    reqs = [Request(p, 12, GREEDY if i % 2 else sampled, seed=i) for i, p in enumerate(prompts)]
    engine = Engine(model)
    batch = engine.generate(reqs)
    for req, got in zip(reqs, batch):
        [alone] = engine.generate([req])
        assert got.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


def test_rows_stop_on_their_own():
    model = tiny()
    engine = Engine(model)
    prompt = [5, 6, 7]
    [free] = engine.generate([Request(prompt, 10, GREEDY)])
    stop_tok = free.tokens[4]
    first = free.tokens.index(stop_tok)
    out = engine.generate([Request(prompt, 10, GREEDY, stop_ids=(stop_tok,)), Request(prompt, 3, GREEDY),
                           Request([9, 9, 9, 9, 9], 10, GREEDY)])
    assert out[0].tokens == free.tokens[:first] and out[0].finish_reason == "stop"
    assert out[1].tokens == free.tokens[:3] and out[1].finish_reason == "length"
    assert len(out[2].tokens) == 10 and out[2].finish_reason == "length"
    # The streaming iterator gives the same tokens and lets the caller end a row.
    gen = engine.start([Request(prompt, 10, GREEDY), Request(prompt, 10, GREEDY)])
    seen: dict[int, list[int]] = {0: [], 1: []}
    for step in gen:
        for row, tok in step:
            seen[row].append(tok)
            if row == 1 and len(seen[1]) == 2:
                gen.stop(1)
    assert seen[0] == free.tokens and seen[1] == free.tokens[:2]
    assert gen.completions[1].tokens == free.tokens[:2] and gen.completions[1].finish_reason == "stop"


def test_greedy_argmax_takes_the_first_of_equal_maxima_as_torch_does():
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    for x in (logits, logits.flip(1), logits.t().contiguous().t(), logits[:, 1:], logits.to(torch.bfloat16)):
        got = argmax(x)
        assert got.dtype == torch.long and torch.equal(got, x.argmax(-1))


@pytest.mark.parametrize("shape", [(1, 8192), (5, 301), (2, 7)], ids=str)  # 301, 7: lanes past the 8-wide ones
def test_token_logprobs_equal_log_softmax(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g) * 8
    logits[0, 3 % shape[1]] = 60.0  # a dominant token: its log-probability is close to 0
    tokens = torch.randint(0, shape[1], (shape[0],), generator=g)
    tokens[0] = 3 % shape[1]
    want = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(token_logprobs(logits, tokens), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(token_logprobs(logits[:, ::1].t().contiguous().t(), tokens), want, atol=1e-5, rtol=1e-5)
    if native.available():
        with pytest.raises(RuntimeError, match="outside the logits"):
            token_logprobs(logits, torch.full((shape[0],), shape[1]))


def test_same_seed_same_tokens_different_seed_different_tokens():
    model = tiny()
    engine = Engine(model)
    cfg = SamplingConfig(temperature=1.5)
    runs = [engine.generate([Request([1, 2, 3], 30, cfg, seed=s)])[0].tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_requests_are_user_errors():
    engine = Engine(tiny())
    with pytest.raises(UserError, match="empty"):
        engine.start([Request([], 5)])
    with pytest.raises(UserError, match="exceed the context"):
        engine.start([Request([1] * 60, 5)])
    with pytest.raises(UserError, match="top-p"):
        engine.start([Request([1], 5, SamplingConfig(top_p=0))])


def test_compile_failure_falls_back_to_eager():
    from torch._dynamo.exc import TorchDynamoException

    model = tiny()
    [ref] = Engine(model).generate([Request([1, 2], 6, GREEDY)])

    def failed_compilation(*args):
        raise TorchDynamoException("backend='inductor' raised:\nCppCompileError: no C++ compiler")

    engine = Engine(model, compile=True, native=False)
    engine._compiled_one = failed_compilation
    [got] = engine.generate([Request([1, 2], 6, GREEDY)])
    assert got.tokens == ref.tokens and engine._compiled_one is None and engine._compiled_rows is None
    assert engine.compile_error == "TorchDynamoException: backend='inductor' raised: CppCompileError: no C++ compiler"

    def bug(*args):  # anything else is a bug and is not hidden by the fallback
        raise IndexError("index 132 is out of bounds")

    engine = Engine(model, compile=True, native=False)
    engine._compiled_one = bug
    with pytest.raises(IndexError):
        engine.generate([Request([1, 2], 6, GREEDY)])


@pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2", "llama"])
def test_compiled_decode_compiles_and_equals_eager(options):
    # A real compilation (inductor's C++ on CPU): a graph break in the decode step would fall back silently.
    model = tiny(**options)
    eager = Engine(model)  # lays the wider-than-tall weights out (in, out) for MKL's one-row product
    refs = eager.generate([Request([1, 2], 6, GREEDY), Request([3], 9, GREEDY)])
    engine = Engine(model, compile=True, native=False)  # and back to (out, in) for the compiled one-row reduction
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))
    [got] = engine.generate([Request([1, 2], 6, GREEDY)])
    assert engine.compile_error is None and engine._compiled_one is not None
    assert got.tokens == refs[0].tokens
    # The compiled steps' logits, not only their argmax: one row, and several rows at their own positions
    # (oneDNN's product as an opaque op, the written cache slots only).
    with torch.inference_mode():
        engine.setup_cache(1, 16)  # the shape the generation above compiled for
        model(torch.tensor([[1, 2, 3]]), torch.arange(3))
        tok, pos = torch.tensor([[4]]), torch.tensor([3])
        torch.testing.assert_close(engine.decode(tok, pos), engine._decode_eager(tok, pos), atol=1e-5, rtol=1e-4)
        engine.setup_cache(2, 16)
        model(torch.tensor([[1, 2, 3], [5, 6, 0]]), torch.arange(3).expand(2, 3))
        tok, pos = torch.tensor([[4], [7]]), torch.tensor([[3], [2]])
        for kv_len in (4, 5):  # the second length compiles a symbolic one
            torch.testing.assert_close(engine.decode(tok, pos, kv_len), engine._decode_eager(tok, pos, kv_len),
                                       atol=1e-5, rtol=1e-4)
    got = engine.generate([Request([1, 2], 6, GREEDY), Request([3], 9, GREEDY)])
    assert engine.compile_error is None and [c.tokens for c in got] == [r.tokens for r in refs]


def test_a_shared_model_keeps_working_across_engines():
    # Another engine (or the speculative decoder) may set up the model's cache in between.
    model = tiny()
    a, b = Engine(model), Engine(model)
    [first] = a.generate([Request([1, 2, 3], 40, GREEDY)])
    b.generate([Request([4], 3, GREEDY)])
    [again] = a.generate([Request([1, 2, 3], 40, GREEDY)])
    assert again.tokens == first.tokens


# ---------------------------------------------------------------- sampling against references

def test_logit_processing_matches_hugging_face_processors():
    torch.manual_seed(3)
    V = 64
    logits = torch.randn(4, V) * 3
    prompts = [[1, 2, 3], [4, 4], [5], [6, 7, 8, 9]]
    cfgs = [SamplingConfig(temperature=0.7, top_k=10),
            SamplingConfig(temperature=1.3, top_p=0.8),
            SamplingConfig(temperature=1.0, min_p=0.1),
            SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)]
    sampler = Sampler(cfgs, [0] * 4, prompts, V, torch.device("cpu"))
    got = sampler.process(logits)
    for row, c in enumerate(cfgs):
        x = logits[row:row + 1].clone()
        ids = torch.tensor([prompts[row]])
        if c.repetition_penalty != 1:
            x = hf_lp.RepetitionPenaltyLogitsProcessor(c.repetition_penalty)(ids, x)
        x = hf_lp.TemperatureLogitsWarper(c.temperature)(ids, x)
        if c.top_k:
            x = hf_lp.TopKLogitsWarper(c.top_k)(ids, x)
        if c.top_p < 1:
            x = hf_lp.TopPLogitsWarper(c.top_p)(ids, x)
        if c.min_p:
            x = hf_lp.MinPLogitsWarper(c.min_p)(ids, x)
        assert torch.equal(torch.isinf(got[row]), torch.isinf(x[0])), row
        keep = ~torch.isinf(x[0])
        torch.testing.assert_close(got[row][keep], x[0][keep])


def test_frequency_and_presence_penalties_follow_the_openai_rule():
    V = 10
    cfg = SamplingConfig(frequency_penalty=0.5, presence_penalty=0.25)
    sampler = Sampler([cfg], [0], [[1]], V, torch.device("cpu"))
    for tok in (3, 3, 4):
        sampler.observe(torch.tensor([tok]))
    logits = torch.zeros(1, V)
    expected = torch.zeros(V)
    expected[3], expected[4] = -(2 * 0.5 + 0.25), -(0.5 + 0.25)  # the prompt token 1 is not penalised
    torch.testing.assert_close(sampler.process(logits)[0], expected)


def test_draws_follow_the_distribution():
    V, n = 6, 20000
    probs = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]])
    sampler = Sampler([SamplingConfig()], [123], [[0]], V, torch.device("cpu"))
    counts = torch.bincount(torch.cat([sampler.draw(probs) for _ in range(n)]), minlength=V).float()
    chi2 = (((counts - n * probs[0]) ** 2) / (n * probs[0])).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    assert not math.isclose(counts[0].item() / n, 1 / V, abs_tol=0.05)


def test_draws_never_pick_a_zero_probability_token_and_rows_keep_their_own_seed():
    V = 9
    probs = torch.zeros(3, V)
    probs[0, 0] = 0.0  # leading, trailing and inner zeros around the mass
    probs[0, [2, 5]] = torch.tensor([0.5, 0.5])
    probs[1, -1] = 1.0
    probs[2, 1:4] = 1 / 3
    sampler = Sampler([SamplingConfig()] * 3, [1, 2, 3], [[0]] * 3, V, torch.device("cpu"))
    draws = torch.stack([sampler.draw(probs) for _ in range(2000)])  # (n, 3)
    assert set(draws[:, 0].tolist()) == {2, 5} and set(draws[:, 1].tolist()) == {8}
    assert set(draws[:, 2].tolist()) == {1, 2, 3}
    # Row 0's draws depend on its seed only, not on the rows beside it.
    alone = Sampler([SamplingConfig()], [1], [[0]], V, torch.device("cpu"))
    assert torch.equal(torch.stack([alone.draw(probs[:1]) for _ in range(2000)])[:, 0], draws[:, 0])


def test_decode_linears_change_kernels_only():
    model, ref = tiny(), tiny()
    use_decode_linears(model)
    assert isinstance(model.lm_head, DecodeLinear) and isinstance(model.blocks[0].mlp.fc, DecodeLinear)
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight is model.tok_emb.weight
    assert model.state_dict().keys() == ref.state_dict().keys()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    for rows in (1, 9):  # one row: MKL on the re-laid weight; several: oneDNN's packed weight
        x = torch.randint(0, 300, (1, rows))
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)  # with autograd: the plain weight


def test_decode_linear_repacks_after_the_weight_changes():
    layer = nn.Linear(16, 24)
    fast = DecodeLinear.wrap(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        fast(x)
        layer.weight.mul_(2)  # e.g. a training step between two generations
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=0)