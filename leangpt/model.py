"""The GPT, readable top to bottom.

GPT-2 by default (learned positions, LayerNorm, tanh-GELU MLP, tied embeddings); llama-style
options (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head), Qwen3's QK-norm and nanochat's
(ReLU² MLP, parameter-free norms, a norm after the embedding, logit softcap) are small branches.
Inference uses a fixed-size KV cache allocated once by `setup_cache` (gpt-fast's shape):
`forward(idx, input_pos)` then writes keys/values at `input_pos` and attends to the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from leangpt.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) if self.weight is None else self.weight * xf.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps, config.norm_weight)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, elementwise_affine=config.norm_weight, bias=config.bias)


def rope_cache(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (block_size, head_dim), halves duplicated (Hugging Face llama layout)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    t = torch.arange(config.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for every position up to max_len, allocated once."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,) shared by every row, or (B, T) per row (a batch of prompts of different lengths);
        # k, v: (B, Hkv, T, D)
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        else:
            rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view is (B, T, Hkv, D)
            self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, written out. q: (B, H, 1, D); k, v: (B, Hkv, L, D) with H a multiple of
    Hkv; mask: True where a key is seen, (1, L) for every row or (B, 1, 1, L) per row. Returns (B, H, 1, D)."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    q = q.reshape(B, Hkv, H // Hkv, 1, D)
    scores = (q * k.unsqueeze(2)).sum(-1) * D ** -0.5  # (B, Hkv, G, L)
    scores = scores.masked_fill(~mask.view(mask.size(0) if mask.dim() == 4 else 1, 1, 1, -1), float("-inf"))
    p = scores.softmax(-1)
    y = (p.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)  # (B, Hkv, G, D)
    return y.reshape(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        (self.n_head, self.n_kv_head), self.head_dim = config.layer_heads(layer), config.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        # QK-norm: one RMSNorm over head_dim, shared by every query head (and one by every key head).
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weight) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weight) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                input_pos: torch.Tensor | None, mask: torch.Tensor | None, kv_len: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is not None:
            assert self.kv_cache is not None, "call model.setup_cache() before decoding with input_pos"
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, max_len, D)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # only the slots written so far: less to read
        if T == 1 and mask is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            # One query per row in a compiled CPU decode step: products and sums that inductor fuses into its
            # own loops cost less than a call to SDPA's kernel for so little arithmetic.
            y = attend_one_query(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.kind = config.mlp
        width = config.layer_mlp_width(layer)
        if self.kind == "swiglu":
            self.gate = nn.Linear(config.n_embd, width, bias=config.bias)
        self.fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.kind == "relu2":
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config, layer)

    def forward(self, x, rope, input_pos, mask, kv_len=None):
        x = x + self.attn(self.norm1(x), rope, input_pos, mask, kv_len)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.norm_emb = make_norm(config) if config.embed_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.pos == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len = 0
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer); or zero (modded-nanogpt), so that every
        # block starts as the identity.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def _float_tensor(self) -> torch.Tensor:
        """A tensor of the model's float dtype and device, even when the embedding is quantized: the final
        norm's weight, or with parameter-free norms the RoPE table or learned positions."""
        if self.norm_f.weight is not None:
            return self.norm_f.weight
        return self.rope_cos if self.pos_emb is None else self.pos_emb.weight

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache once for (batch, max_len); a cache of that shape already there is kept.

        Keeping it is safe: a query at position p only sees slots 0..p, which the new sequence writes first.
        It also keeps the tensors that a compiled decode step was traced with.
        """
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        param = self._float_tensor()
        dtype = dtype or param.dtype
        cache = self.blocks[0].attn.kv_cache
        if cache is not None and cache.k.shape[0] == batch and self.cache_len == max_len \
                and cache.k.dtype == dtype and cache.k.device == param.device:
            return
        for block in self.blocks:
            a = block.attn
            a.kv_cache = KVCache(batch, max_len, a.n_kv_head, a.head_dim, dtype, param.device)
        self.cache_len = max_len

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The first block's input (B, T, C) for tokens idx (B, T) at positions pos (T,) or (B, T)."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        if self.norm_emb is not None:
            x = self.norm_emb(x)
        return self.drop(x)

    def rope_at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's (cos, sin) at positions pos: (T, D), or (B, 1, T, D) for per-row positions (B, T)."""
        if self.config.pos != "rope":
            return None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        return (cos.unsqueeze(1), sin.unsqueeze(1)) if pos.dim() == 2 else (cos, sin)

    def forward_hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                       kv_len: int | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, C).

        With input_pos, reads and writes the KV cache: (T,) positions shared by every row, or (B, T) positions
        per row, so that right-padded prompts of different lengths decode in one batch (each row's position
        is its cache slot; a slot past a row's prompt is overwritten by its own decode before it is attended).
        kv_len, when the caller knows that every position is below it, attends to the first kv_len slots
        only instead of the whole cache (same result, less to read; a new length is a new shape when compiled).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        x, rope = self.embed(idx, pos), self.rope_at(pos)
        mask = None
        if input_pos is not None:
            # Query at position p sees cache slots 0..p.
            kv_len = min(kv_len or self.cache_len, self.cache_len)
            key_pos = torch.arange(kv_len, device=idx.device)
            mask = key_pos <= input_pos[..., None]  # (T, max_len), or (B, T, max_len) per row
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)  # (B, 1, T, max_len)
        for block in self.blocks:
            x = block(x, rope, input_pos, mask, kv_len)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        logits = self.lm_head(self.forward_hidden(idx, input_pos, kv_len))
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)
