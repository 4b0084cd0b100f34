"""Model configuration: one dataclass and a table of named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leangpt.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length (learned positions / RoPE cache)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    head_dim: int | None = None  # width of each attention head; None means n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; None means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_weight: bool = True  # False: parameter-free norms (nanochat)
    embed_norm: bool = False  # normalise the token embeddings before the first block (nanochat)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    mlp: str = "gelu"  # "gelu" (GPT-2, tanh approximation) | "swiglu" | "relu2" (ReLU squared)
    pos: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # logits become cap * tanh(logits / cap); None leaves them as they are
    zero_init_proj: bool = False  # attention and MLP output projections start at zero (init only)
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # Structured pruning leaves layers of different widths; None means every layer has the sizes above.
    layer_n_head: list[int] | None = None  # query heads per layer; KV heads keep the n_head / n_kv_head group size
    layer_intermediate_size: list[int] | None = None  # MLP hidden width per layer

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim <= 0 or (self.pos == "rope" and self.head_dim % 2):
            raise UserError(f"model config: head_dim must be positive (and even with RoPE), got {self.head_dim}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model config: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise UserError(f"model config: norm must be layernorm or rmsnorm, got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu", "relu2"):
            raise UserError(f"model config: mlp must be gelu, swiglu or relu2, got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            raise UserError(f"model config: pos must be learned or rope, got {self.pos!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise UserError(f"model config: logit_softcap must be positive or null, got {self.logit_softcap}")
        group = self.n_head // self.n_kv_head
        for name, unit in (("layer_n_head", group), ("layer_intermediate_size", 1)):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.n_layer or any(s <= 0 or s % unit for s in sizes)):
                raise UserError(f"model config: {name} must list {self.n_layer} positive sizes"
                                f"{f' divisible by {unit}' if unit > 1 else ''}, got {sizes}")

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of one layer; head_dim is the same in every layer."""
        if self.layer_n_head is None:
            return self.n_head, self.n_kv_head
        h = self.layer_n_head[layer]
        return h, h // (self.n_head // self.n_kv_head)

    def layer_mlp_width(self, layer: int) -> int:
        return self.intermediate_size if self.layer_intermediate_size is None else self.layer_intermediate_size[layer]

    @property
    def is_gpt2(self) -> bool:
        """True when the architecture is exactly Hugging Face's GPT-2."""
        return (self.norm, self.mlp, self.pos) == ("layernorm", "gelu", "learned") and self.bias \
            and self.n_kv_head == self.n_head and self.tie_embeddings and self.norm_weight \
            and not (self.embed_norm or self.qk_norm) and self.logit_softcap is None \
            and self.head_dim == self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.head_dim * self.n_head == self.n_embd:
            d["head_dim"] = None  # derived: it follows n_embd and n_head when either is overridden
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Widths are multiples of 64 so that group-wise low-bit formats apply.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: well under 1M parameters at a 2k vocabulary.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    # Learns Shakespeare usefully on a 2-core CPU in minutes (~10M parameters at an 8k vocabulary).
    "small-cpu": dict(n_layer=4, n_head=6, n_embd=384, block_size=256),
    # small-cpu's shape as Hugging Face's qwen3: RoPE, RMSNorm, QK-norm, SwiGLU (of small-cpu's MLP parameter
    # count), no biases, untied head.
    "small-cpu-qwen3": dict(n_layer=4, n_head=6, n_embd=384, block_size=256, intermediate_size=1024,
                            norm="rmsnorm", mlp="swiglu", pos="rope", qk_norm=True, bias=False,
                            tie_embeddings=False),
    # The main job's model, for the best bits per byte from about 5 minutes of 2-core CPU training with
    # optimizer=muon (bench/bench_recipe.py: narrower than small-cpu, so that it sees more tokens): Qwen3's
    # architecture, 4 layers x 256, SwiGLU of 704, output projections starting at zero (~7.4M parameters at 8k).
    "cpu-5min": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, intermediate_size=704, norm="rmsnorm",
                     mlp="swiglu", pos="rope", qk_norm=True, bias=False, tie_embeddings=False, zero_init_proj=True),
    # tiny's shape as the same kind of model, for the tests of everything downstream of it.
    "tiny-qwen3": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, norm="rmsnorm", mlp="swiglu", pos="rope",
                       qk_norm=True, bias=False, tie_embeddings=False, zero_init_proj=True),
    # The published GPT-2 shapes.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}
