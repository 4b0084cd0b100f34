"""Linear layers for decoding on a CPU: the fastest fp32 kernel for the number of activation rows.

Measured here (2-core AMD EPYC, torch 2.13, MKL and oneDNN as shipped, weights beyond the cache):
- one row (batch-1 decode): MKL's matrix-vector product, with the weight in the memory order that suits it:
  (in, out) when out > in (the 8192x384 output head: 0.50 ms vs 1.32 ms (out, in); 384->1536: 0.15 vs 0.31 ms),
  (out, in) otherwise (1536->384: 0.16 ms vs 0.28 ms (in, out)); oneDNN is 1.2-1.8x slower than the better one;
- several rows (batched decode, speculative verification, prefill): oneDNN's inner product on a weight
  reordered once into its blocked format, 1.3-2.3x faster than MKL in either order (the head at 8 rows:
  0.92 ms vs 1.96 ms).
- one row inside a compiled decode step: no library call at all; the product is written as multiply-and-sum,
  which inductor turns into a vectorised reduction over contiguous (out, in) weight rows, threaded over outputs
  and fused with the bias: 2.3-3.4x MKL's best at 2 threads, ten products in one graph (384->1536: 57 us vs
  131 us), and the whole step runs without leaving the generated code except for attention.
So a `DecodeLinear` keeps its ordinary `weight` (one row, training, state dicts) and, on CPUs with oneDNN, a
packed copy for several rows: decoding holds the linear weights twice in memory.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


_ONEDNN = torch.backends.mkldnn.is_available()
_MODULES: "weakref.WeakValueDictionary[int, DecodeLinear]" = weakref.WeakValueDictionary()  # for packed_linear
_handles = itertools.count()


def stored(x: torch.Tensor) -> torch.Tensor:
    """x itself, which inductor must now compute once into a buffer of its own (a view needs its storage).
    For the input of a compiled one-row product: inlined, a normalised or activated input is recomputed for
    every weight row, or makes inductor's size heuristics store the (dequantized) weight products first. With it,
    inductor's default heuristics fit every linear kind here (an int4 model's step took 0.66 ms against 1.40
    with a low realize threshold for all, 2026-12-04)."""
    return x.as_strided(x.shape, x.stride())


@torch.library.custom_op("leangpt::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    """The product of DecodeLinear `handle` on its oneDNN-packed weight, as one opaque call that a compiled
    graph can hold (inductor cannot take the packed tensor itself)."""
    module = _MODULES.get(handle)
    if module is None or module.weight.data_ptr() != weight.data_ptr():  # never a stale copy
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, module.packed_weight(), bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


class DecodeLinear(nn.Linear):
    """nn.Linear sharing the original module's parameters, with a oneDNN-packed weight for several rows.

    The packed copy is used only without autograd, and is rebuilt if the weight was modified in place since
    packing (its version counter moved), so training between generations stays correct."""

    packed: torch.Tensor | None = None
    _packed_version = -1

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "DecodeLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: ties and state dicts hold
        new.handle = next(_handles)
        _MODULES[new.handle] = new
        return new

    def packed_weight(self) -> torch.Tensor:
        if self.packed is None or self._packed_version != self.weight._version:
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous(), 8)
            self._packed_version = self.weight._version
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == x.size(-1)
        if torch.compiler.is_compiling() and one_row and self.weight.is_contiguous():
            # One row, compiled: a multiply-and-sum that inductor fuses into one vectorised, threaded
            # reduction over contiguous weight rows (bias and activation fused in), not an MKL call.
            y = (stored(x).unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        if (_ONEDNN and not one_row and not torch.is_grad_enabled()
                and x.dtype == self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"):
            if torch.compiler.is_compiling():
                return packed_linear(x, self.weight, self.bias, self.handle)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module, one_row_order: bool = True) -> None:
    """Prepare every plain nn.Linear of a CPU model for decoding, in place: `DecodeLinear` for several rows, and
    the weight's memory order for one row: as measured above for MKL (`one_row_order`), or plain (out, in) for
    the compiled one-row reduction. Values, shapes, parameter names and saved files are unchanged; quantized
    and other custom linear modules are left as they are."""
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) not in (nn.Linear, DecodeLinear) or child.weight.dim() != 2:
                    continue
                w = child.weight
                in_out = one_row_order and w.size(0) > w.size(1)
                if in_out != (w.stride(0) == 1 and w.size(1) > 1):
                    # A tied embedding shares the new order.
                    w.data = w.data.t().contiguous().t() if in_out else w.data.contiguous()
                if type(child) is nn.Linear:
                    setattr(parent, name, DecodeLinear.wrap(child))
