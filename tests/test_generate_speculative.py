"""Speculative decoding: greedy output identical to the target alone; sampled output keeps the target's law."""

import pytest
import torch

from leangpt.config import ModelConfig
from leangpt.engine import Engine, Request
from leangpt.errors import UserError
from leangpt.model import GPT
from leangpt.sampling import Sampler, SamplingConfig
from leangpt.speculative import SpeculativeGeneration, accept_draft

GREEDY = SamplingConfig(temperature=0)
CHI2_15_DOF_P001 = 37.7


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int, vocab: int = 300, scale: float = 4.0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=vocab, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def noisy_copy(model: GPT, seed: int, noise: float) -> GPT:
    """A draft that mostly agrees with the target."""
    draft = GPT(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return draft


def speculative(target, draft, request, k, native=True):
    """A speculative generation run to its end; target and draft: models (each put in an Engine) or Engines."""
    engines = [m if isinstance(m, Engine) else Engine(m, native=native) for m in (target, draft)]
    spec = SpeculativeGeneration(*engines, request, k)
    chunks = list(spec)
    assert sum(chunks, []) == spec.completion.tokens
    return spec


@pytest.mark.parametrize("native", [True, False], ids=["c++-step", "python-step"])
@pytest.mark.parametrize("options", [{}, dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1)],
                         ids=["gpt2", "llama"])
def test_greedy_speculative_equals_target_alone(options, native):
    target = tiny(0, **options)
    prompt = [3, 1, 4, 1, 5]
    [alone] = Engine(target).generate([Request(prompt, 40, GREEDY)])
    for name, draft in {"self": target, "close": noisy_copy(target, 1, 0.002), "unrelated": tiny(9, **options)}.items():
        for k in (1, 4):
            spec = speculative(target, draft, Request(prompt, 40, GREEDY), k, native)
            assert spec.completion.tokens == alone.tokens, (name, k)
            torch.testing.assert_close(torch.tensor(spec.completion.logprobs), torch.tensor(alone.logprobs),
                                       atol=1e-4, rtol=0)
            if name == "self":
                assert spec.stats.acceptance_rate == 1.0 and spec.stats.rounds == -(-40 // (k + 1))


def test_speculative_stops_at_a_stop_token():
    target = tiny(0)
    [alone] = Engine(target).generate([Request([7, 8], 20, GREEDY)])
    stop = alone.tokens[5]
    spec = speculative(target, tiny(2), Request([7, 8], 20, GREEDY, stop_ids=(stop,)), 4)
    assert spec.completion.tokens == alone.tokens[:alone.tokens.index(stop)]
    assert spec.completion.finish_reason == "stop"


def test_accept_rule_keeps_the_target_distribution():
    # Draft distributions far from the target's: only the rule can bring the output back to p.
    V, k, n = 5, 2, 12000
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.6, 0.1, 0.1, 0.1, 0.1]])
    sampler = Sampler([SamplingConfig()], [5], [[0]], V, torch.device("cpu"))
    first = torch.zeros(V)
    for _ in range(n):
        draft = torch.stack([sampler.draw(q[i:i + 1])[0] for i in range(k)])
        first[accept_draft(p, q, draft, sampler)[0]] += 1
    chi2 = (((first - n * p[0]) ** 2) / (n * p[0])).sum().item()
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    chi2_draft = (((first - n * q[0]) ** 2) / (n * q[0])).sum().item()
    assert chi2_draft > 1000  # the test can tell the draft's law from the target's


def test_sampled_speculative_keeps_the_targets_law_on_a_tiny_model():
    V, n, prompt = 4, 1200, [1, 2]
    target, draft = tiny(0, vocab=V, scale=6.0), tiny(5, vocab=V, scale=6.0)
    with torch.no_grad():
        exact = torch.zeros(V, V)  # P(first two new tokens) under the target alone
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        for a in range(V):
            exact[a] = p1[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
        exact_draft = torch.zeros(V, V)
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
        for a in range(V):
            exact_draft[a] = q1[a] * draft(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
    counts = torch.zeros(V, V)
    cfg = SamplingConfig(temperature=1.0)
    engines = Engine(target), Engine(draft)
    for seed in range(n):
        spec = speculative(*engines, Request(prompt, 3, cfg, seed=seed), 2)
        a, b = spec.completion.tokens[:2]
        counts[a, b] += 1
    chi2 = (((counts - n * exact) ** 2) / (n * exact)).sum().item()
    assert chi2 < CHI2_15_DOF_P001
    chi2_draft = (((counts - n * exact_draft) ** 2) / (n * exact_draft)).sum().item()
    assert chi2_draft > 3 * CHI2_15_DOF_P001  # the draft's own law is clearly rejected


def test_speculative_refuses_what_it_cannot_do():
    target = tiny(0)
    with pytest.raises(UserError, match="vocabulary"):
        SpeculativeGeneration(Engine(target), Engine(tiny(1, vocab=200)), Request([1], 4), 4)
    with pytest.raises(UserError, match="penalties"):
        SpeculativeGeneration(Engine(target), Engine(tiny(1)), Request([1], 4, SamplingConfig(repetition_penalty=1.2)),
                              4)
