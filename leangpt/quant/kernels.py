"""Drop-in quantized linear modules, one per compute kernel, and the per-device choice among them.

Each module is built from a device-independent QuantizedWeight and packs it for its kernel on the target
device at load. `reference` dequantizes one layer's weight per call and runs F.linear: slow, obviously
correct, and what tests compare every other kernel against. Which kernel is fastest depends on the
machine (torch's int8/int4 "pack" kernels are tuned for AVX-512/AMX CPUs and GPUs; FBGEMM's dynamic int8
linear is fast on AVX2 CPUs), so `choose_kernel` times the correct candidates once per
(machine, torch version, threads, scheme, layer shape) on a one-token input and keeps the result in the
cache of measurements (leangpt.machine). LEANGPT_QUANT_KERNEL=name forces one.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from leangpt.cpu_linear import stored
from leangpt.device import sync
from leangpt.errors import UserError
from leangpt.machine import cached, machine_key
from leangpt.quant import native
from leangpt.quant.formats import QuantizedWeight, Scheme, quantize_rtn, round_activations


class QuantLinear(nn.Module):
    """Base: y = x Wᵀ + b with W held in a kernel-specific packed form. `bias` is the only saved tensor."""

    kernel = ""
    # w8a8 kernels round the activations too: another computation than the weight-only one the checkpoint
    # describes, so the automatic choice passes them by and only LEANGPT_QUANT_KERNEL selects them.
    quantizes_activations = False

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = qw.in_features, qw.out_features, qw.scheme
        self.register_buffer("bias", None if bias is None else bias.detach().float().to(device))

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return True

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.scheme.name}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.scheme.activations == "int8" and not self.rounds_inputs(x.numel() // shape[-1]):
            x = round_activations(x, self.scheme.activation_group(self.in_features))
        y = self.matmul(x.reshape(-1, shape[-1]))  # (N, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rounds_inputs(self, rows: int) -> bool:
        """Whether matmul of this many rows rounds an int8-activation scheme's inputs itself, as round_activations
        does (then forward leaves them to it)."""
        return False


class ReferenceLinear(QuantLinear):
    """Dequantize this layer's weight on every call, then F.linear. Any scheme, any device."""

    kernel = "reference"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.qw = QuantizedWeight(qw.scheme, qw.qweight.to(device), qw.scales.to(device),
                                  None if qw.zeros is None else qw.zeros.to(device), qw.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qw.dequantize(x.dtype))


class Int8PackLinear(QuantLinear):
    """torch._weight_int8pack_mm: int8 weight-only, activations stay in float."""

    kernel = "int8pack"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.register_buffer("q", qw.qweight.to(device), persistent=False)
        self.register_buffer("scales", qw.scales.to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 8 and hasattr(torch, "_weight_int8pack_mm")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scales.to(x.dtype))


class Int4PackCPULinear(QuantLinear):
    """torch._weight_int4pack_mm_for_cpu: int4 group-wise weight-only. Needs in_features % group_size == 0
    and out_features % 16 == 0.

    torch's format dequantizes as (q - 8) · s + m, so our (q - z) · s is stored with m = (8 - z) · s.
    """

    kernel = "int4pack"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.group_size = qw.scheme.group_size
        q = qw.int_weight().to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        mins = (8 - qw.zeros.float()) * qw.scales
        sz = torch.stack((qw.scales, mins), dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
        self.register_buffer("scales_zeros", sz, persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return (scheme.bits == 4 and device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")
                and scheme.group_size in (32, 64, 128, 256) and in_features % scheme.group_size == 0
                and out_features % 16 == 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros.to(x.dtype))


class Int4PackCUDALinear(QuantLinear):
    """torch._weight_int4pack_mm on CUDA (gpt-fast's tinygemm kernel): int4 group-wise weight-only with bf16
    activations (the kernel takes no other), the output cast back. Needs in_features % 128 == 0 (8 inner
    k-tiles of 16) and out_features % 8 == 0. Same (q - 8) · s + m form as the CPU kernel above."""

    kernel = "int4pack-cuda"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.group_size = qw.scheme.group_size
        q = qw.int_weight().to(torch.int32)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)  # (out, in/2): even column high
        self.register_buffer("packed", torch._convert_weight_to_int4pack(pairs, 8), persistent=False)
        mins = (8 - qw.zeros.float()) * qw.scales
        sz = torch.stack((qw.scales, mins), dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
        self.register_buffer("scales_zeros", sz.to(device, torch.bfloat16), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return (scheme.bits == 4 and device.type == "cuda" and hasattr(torch, "_weight_int4pack_mm")
                and scheme.group_size in (32, 64, 128, 256) and in_features % 128 == 0
                and in_features % scheme.group_size == 0 and out_features % 8 == 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros)
        return y.to(x.dtype)


def _fbgemm_prepack(w_int: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                    bias: torch.Tensor | None = None) -> object:
    """Pack per-output-channel affine int8 weights (and the fp32 bias) for torch.ops.quantized.linear_dynamic."""
    with warnings.catch_warnings():  # quantized-tensor constructors warn of deprecation; FBGEMM still needs them
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(w_int.to(torch.int8), scales.double(), zero_points.long(), 0)
        return torch.ops.quantized.linear_prepack(qt, bias)


def _fbgemm_available(device: torch.device) -> bool:
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


class FbgemmLinear(QuantLinear):
    """FBGEMM's dynamic int8 linear (w8a8): activations are quantized per call to 7-bit-range uint8 (one
    scale per call, as torch.ao's quantize_dynamic does), weights are the stored int8 per-channel integers."""

    kernel = "fbgemm"
    quantizes_activations = True

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        # The bias goes into FBGEMM's packed params: one fused call per forward, as torch.ao's module makes.
        self.packed = _fbgemm_prepack(qw.qweight, qw.scales, torch.zeros(qw.out_features), self.bias)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 8 and _fbgemm_available(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # linear_dynamic takes any leading dims; no reshape or separate bias add on the decode path.
        y = torch.ops.quantized.linear_dynamic(x if x.dtype == torch.float32 else x.float(), self.packed, True)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class FbgemmGroupsLinear(QuantLinear):
    """int4 groups on FBGEMM's int8 kernel: each group of columns is exactly an int8 per-channel affine
    matrix (q ∈ [0, 15], zero point z, scale s), so y = Σ_g linear_dynamic(x_g, W_g). One call per group."""

    kernel = "fbgemm-groups"
    quantizes_activations = True

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        g = qw.scheme.group_size
        q = qw.int_weight()
        self.splits = [min(g, qw.in_features - s) for s in range(0, qw.in_features, g)]
        self.packed = [_fbgemm_prepack(q[:, i * g:i * g + n], qw.scales[:, i], qw.zeros[:, i])
                       for i, n in enumerate(self.splits)]

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 4 and _fbgemm_available(device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.float().split(self.splits, dim=-1)
        y = torch.ops.quantized.linear_dynamic(parts[0], self.packed[0], True)
        for part, packed in zip(parts[1:], self.packed[1:]):
            y += torch.ops.quantized.linear_dynamic(part, packed, True)
        return y.to(x.dtype)


class CompileError(RuntimeError):
    """A kernel that needs compiling could not be built here (no C++ compiler, an inductor error, ...)."""


_COMPILED: dict[tuple, object] = {}  # one compiled kernel per (function, argument shapes), shared by layers


def _compiled(fn, *args: torch.Tensor):
    """fn traced on these argument shapes and compiled by inductor (its C++ CPU codegen), called without
    torch.compile's per-call guards (~20 µs a call here, more than a small layer's whole matmul)."""
    key = (fn.__name__, *((tuple(a.shape), a.stride(), a.dtype) for a in args))
    if key not in _COMPILED:
        _COMPILED[key] = None  # a failure is remembered too: each layer of this shape would fail alike
        try:
            from torch._inductor.compile_fx import compile_fx
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad():
                graph = make_fx(fn)(*args)
                compiled = compile_fx(graph, list(args))
                compiled(*args)  # builds the C++ kernel now, not at the first real call
        except Exception as e:  # any failure to trace, generate or build C++ means: not on this machine
            raise CompileError(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
        _COMPILED[key] = compiled
    if _COMPILED[key] is None:
        raise CompileError(f"{fn.__name__} failed to compile earlier in this process")
    return _COMPILED[key]


def _int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for a few rows x (M, in_pad), W (out, in_pad) held as packed (in_pad/2, out) uint8, byte [r, o]
    holding columns 2r (low nibble) and 2r+1 (high) of row o; scales and scales·zeros (G, out).
    Per group, Σ (q - z)·s·x = s·Σ q·x - s·z·Σ x: the reductions read the nibbles with the output columns as
    the vector lanes and convert each to float once, and each stays a few operations, so that inductor fuses
    it rather than storing the dequantized weight first. Each row reads the weight again: for few rows only."""
    half, out = packed.shape
    G, M = scales.shape[0], x.shape[0]
    p = packed.view(G, half // G, out)  # (G, g/2, out)
    x_even = x[:, 0::2].reshape(M, G, half // G, 1)
    x_odd = x[:, 1::2].reshape(M, G, half // G, 1)
    qx = ((p & 15).float() * x_even).sum(2) + ((p >> 4).float() * x_odd).sum(2)  # (M, G, out)
    x_sums = x.view(M, G, -1).sum(-1, keepdim=True)  # (M, G, 1)
    return (qx * scales - x_sums * szeros).sum(1)  # (M, out)


def _int4_dequant(packed: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor) -> torch.Tensor:
    """The same weight as a float (in_pad, out) matrix, for inputs of many rows (prefill, batches)."""
    half, out = packed.shape
    G = scales.shape[0]
    p = packed.view(G, half // G, 1, out)
    q = torch.cat((p & 15, p >> 4), 2).float()  # (G, g/2, 2, out)
    return (q * scales[:, None, None, :] - szeros[:, None, None, :]).view(2 * half, out)


def _int8_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for a few rows x (M, in), W = q (out, in) int8 times scales (out,): one vectorised reduction over
    each contiguous weight row, the int8 → float conversion fused in, the scale applied once per output."""
    return (x.unsqueeze(-2) * q.float()).sum(-1) * scales  # (M, out)


def _int8_dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same weight as a float (in, out) matrix, for inputs of many rows."""
    return (q.float() * scales[:, None]).t()


def _int8_words_gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """_int8_gemv with the int8 rows read as int32 words (out, in/4), four weights each: every load fills an
    AVX2 vector (inductor loads 8 int8 at a time otherwise, a partial load ATen's AVX2 code does by memcpy).
    Byte k of a word is sign-extended by shifts and pairs with inputs k, k + 4, ... (little-endian)."""
    xs = x.view(x.shape[0], -1, 4).transpose(1, 2).contiguous()  # (M, 4, in/4)
    acc = (xs[:, 0].unsqueeze(-2) * ((words << 24) >> 24).float()).sum(-1)
    for k in (1, 2, 3):
        acc = acc + (xs[:, k].unsqueeze(-2) * ((words << (24 - 8 * k)) >> 24).float()).sum(-1)
    return acc * scales  # (M, out)


def _int8_words_dequant(words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _int8_dequant(words.view(torch.int8), scales)


# Up to this many rows a fused kernel takes the product, above it dequantize-then-matmul does. Inside the
# compiled batch-8 decode step of the pipeline's models, 8 fused rows against 4: GPTQ-int4 2.04 ms against 3.31,
# int8 1.47 against 1.65 (2026-12-04); alone, 8 fused int4 rows beat dequantize-then-matmul for every layer
# shape (768x256: 60 us against 102), int8 only for the 8192x256 head (397 us against 724; 768x256: 41 against
# 30). Also the rows callers warm up.
GEMV_ROWS = 8
# From this many rows on (eval, long prefills) the matmul dwarfs an uncompiled dequantize (int4 768x256: 0.22 ms
# against 3.6 ms for 2,048 rows), so those calls never wait for a compiler: its first use in a process costs
# ~3 s, and each layer shape 0.25 s more even from the on-disk cache (2026-12-04).
EAGER_DEQUANT_ROWS = 1024


def float_input(x: torch.Tensor, in_pad: int) -> torch.Tensor:
    """x (rows, in) as contiguous float32, zero columns appended up to in_pad (the packed width)."""
    xf = x.float()
    if in_pad > x.shape[1]:
        xf = F.pad(xf, (0, in_pad - x.shape[1]))
    return xf.contiguous()


class FusedLinear(QuantLinear):
    """Base of the kernels that torch.compile's inductor generates as vectorised C++ from the stored integers:
    for up to `gemv_rows` rows of activations (decode, small batches) one fused dequantize-and-reduce kernel
    (weights stay at their stored width in memory, no float copy); more rows dequantize the layer once per call
    by a compiled kernel (uncompiled from EAGER_DEQUANT_ROWS rows), then matmul. Inside a compiled model (Engine(compile=True)) the same tensor ops are
    traced into the model's graph instead. Float activations and float accumulation, so it equals
    dequantize-then-matmul up to float rounding.
    Where the kernels cannot be compiled (no C++ compiler, ...) the layer warns and runs the same tensor ops
    eagerly; its `kernel` then reads `<kernel>-eager`."""

    # Each subclass gives its layout: the fused kernel and dequantize functions of its packed tensors, the
    # rows the fused kernel pays for, and the input width its packing pads to.
    gemv_fn = dequant_fn = None
    gemv_rows = GEMV_ROWS
    in_pad = 0

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self._gemv: dict[int, object] = {}  # by row count; compiled at first use (once per shape in a process)
        self._dequant = None

    def weights(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xf, w = float_input(x, self.in_pad), self.weights()
        few = xf.shape[0] <= self.gemv_rows
        gemv, dequant = self.gemv_fn, self.dequant_fn
        if torch.compiler.is_compiling():  # inside a compiled model: inline the tensor ops
            return (gemv(stored(xf), *w) if few else xf @ dequant(*w)).to(x.dtype)
        if self.kernel == type(self).kernel and xf.shape[0] < EAGER_DEQUANT_ROWS:
            try:
                if few:
                    rows = xf.shape[0]
                    if rows not in self._gemv:
                        self._gemv[rows] = _compiled(gemv, xf, *w)
                    return self._gemv[rows](xf, *w).to(x.dtype)
                if self._dequant is None:
                    self._dequant = _compiled(dequant, *w)
                return (xf @ self._dequant(*w)).to(x.dtype)
            except CompileError as e:
                self.kernel = f"{type(self).kernel}-eager"
                warnings.warn(f"quantized kernel {type(self).kernel!r} could not be compiled here, so this layer "
                              f"runs it uncompiled as {self.kernel!r} (dequantize the stored integers per call, "
                              f"then matmul): {e}")
        return (xf @ dequant(*w)).to(x.dtype)  # eager: the same computation, uncompiled


class InductorLinear(FusedLinear):
    """int4 groups from the packed nibbles (8x fewer bytes than fp32). A shorter last group (in_features not a
    multiple of the group size) is padded with zero columns here."""

    kernel = "inductor"
    gemv_fn, dequant_fn = staticmethod(_int4_gemv), staticmethod(_int4_dequant)

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        g = qw.scheme.group_size
        self.in_pad = -(-qw.in_features // g) * g
        q = F.pad(qw.int_weight(), (0, self.in_pad - qw.in_features))  # (out, in_pad) uint8
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).t().contiguous()  # (in_pad/2, out)
        self.register_buffer("packed", packed.to(device), persistent=False)
        self.register_buffer("qscales", qw.scales.t().contiguous().to(device), persistent=False)  # (G, out)
        szeros = (qw.scales * qw.zeros.float()).t().contiguous()
        self.register_buffer("szeros", szeros.to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 4 and device.type == "cpu"

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.qscales, self.szeros


class InductorInt8Linear(FusedLinear):
    """int8 per output channel, from the stored (out, in) integers (4x fewer bytes than fp32). On CPUs where
    torch's int8pack kernel is slow for one row (here 179 us for 768x256 against 25 us for this one)."""

    kernel = "inductor-int8"
    gemv_fn, dequant_fn = staticmethod(_int8_gemv), staticmethod(_int8_dequant)

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.register_buffer("q", qw.qweight.contiguous().to(device), persistent=False)
        self.register_buffer("qscales", qw.scales.float().contiguous().to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 8 and device.type == "cpu"

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.qscales


class InductorInt8WordsLinear(FusedLinear):
    """inductor-int8 with the stored integers read four at a time as int32 words (inputs padded to a multiple
    of 4). On an AVX2-only EPYC 2.5-3x faster than inductor-int8 for one row (the 8192x256 head: 0.50 ms
    against 1.53); with AVX-512 the per-shape timing decides between them."""

    kernel = "inductor-int8-words"
    gemv_fn, dequant_fn = staticmethod(_int8_words_gemv), staticmethod(_int8_words_dequant)

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.in_pad = -(-qw.in_features // 4) * 4
        q = F.pad(qw.qweight, (0, self.in_pad - qw.in_features)).contiguous()
        self.register_buffer("words", q.view(torch.int32).to(device), persistent=False)
        self.register_buffer("qscales", qw.scales.float().contiguous().to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 8 and device.type == "cpu" and sys.byteorder == "little"

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.words, self.qscales


class NativeLinear(QuantLinear):
    """Base of the kernels in leangpt's own C++ (native.cpp, built once per machine for its instruction set):
    up to `gemv_rows` rows of activations take a product that reads the stored integers at their width and
    converts them in registers, once for every four rows; more rows dequantize the layer once per call, then
    matmul. Float activations and accumulation: dequantize-then-matmul up to float rounding (an a8 layer's rows
    take the integer products int4_a8_gemv / int8_a8_gemv, which round them as round_activations does, so
    QuantLinear.forward leaves them as they are: rounding them twice cost 0.3-2x the product). Inside a compiled
    model the operators are called from the compiled graph."""

    gemv_rows = GEMV_ROWS
    in_pad = 0

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        if not self.available(qw.scheme, device, qw.out_features, qw.in_features):
            raise RuntimeError(f"kernel {self.kernel!r} cannot run {qw.scheme.name} on {device} here")
        super().__init__(qw, bias, device)

    @staticmethod
    def native_available(device: torch.device) -> bool:
        return device.type == "cpu" and native.available()

    def weights(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def rounds_inputs(self, rows: int) -> bool:
        # int8-a8 takes its integer products at any row count: 1.3-3.9x faster than dequantize-then-matmul from 64
        # to 1,024 rows (AVX-512 EPYC with VNNI, 2026-12-08), where int4-a8's lose from 256 rows on
        return self.scheme.activations == "int8" and (self.scheme.bits == 8 or rows <= self.gemv_rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xf, ops = float_input(x, self.in_pad), torch.ops.leangpt_native
        if self.rounds_inputs(xf.shape[0]):  # the C++ rounds the rows, then integer products
            y = (ops.int8_a8_gemv if self.scheme.bits == 8 else ops.int4_a8_gemv)(xf, *self.weights())
        elif xf.shape[0] <= self.gemv_rows:
            y = (ops.int8_gemv if self.scheme.bits == 8 else ops.int4_gemv)(xf, *self.weights())
        else:
            y = F.linear(xf, (ops.int8_dequant if self.scheme.bits == 8 else ops.int4_dequant)(*self.weights()))
        return y.to(x.dtype)


class NativeInt8Linear(NativeLinear):
    """int8 per output channel from the stored (out, in) integers. Its product converts each weight vector
    once for four rows, and stays faster than dequantize-then-matmul up to 32 rows (704 × 256: 118 against 148 µs
    at 32 rows, 247 against 217 at 64, on the 2-core EPYC)."""

    kernel = "native-int8"
    gemv_rows = 32

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        self.register_buffer("q", qw.qweight.contiguous().to(device), persistent=False)
        self.register_buffer("qscales", qw.scales.float().contiguous().to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 8 and NativeLinear.native_available(device)

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.qscales


class NativeInt4Linear(NativeLinear):
    """int4 groups (a multiple of 32 inputs) from nibbles packed per block of 32 inputs: byte j holds input j
    in its low nibble and input j + 16 in its high one, so one 16-byte load unpacks into four 8-lane vectors
    of consecutive inputs. A shorter last group is padded with zero columns."""

    kernel = "native-int4"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(qw, bias, device)
        g = qw.scheme.group_size
        self.in_pad = -(-qw.in_features // g) * g
        q = F.pad(qw.int_weight(), (0, self.in_pad - qw.in_features)).view(qw.out_features, -1, 2, 16)
        packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(qw.out_features, -1)  # (out, in_pad/2)
        self.register_buffer("packed", packed.contiguous().to(device), persistent=False)
        self.register_buffer("qscales", qw.scales.float().contiguous().to(device), persistent=False)  # (out, G)
        szeros = (qw.scales * qw.zeros.float()).contiguous()
        self.register_buffer("szeros", szeros.to(device), persistent=False)

    @staticmethod
    def available(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> bool:
        return scheme.bits == 4 and scheme.group_size % 32 == 0 and NativeLinear.native_available(device)

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.qscales, self.szeros


KERNELS: dict[str, type[QuantLinear]] = {k.kernel: k for k in (
    ReferenceLinear, FbgemmLinear, FbgemmGroupsLinear, Int8PackLinear, Int4PackCPULinear, Int4PackCUDALinear,
    InductorLinear, InductorInt8Linear, InductorInt8WordsLinear, NativeInt8Linear, NativeInt4Linear)}

# Relative output error a kernel may show against `reference` and still count as correct: float
# rounding for weight-only kernels, bf16 activations for CUDA's int4 kernel, 7-bit dynamic activation
# quantization for FBGEMM (~1 %).
TOLERANCE = {"reference": 1e-5, "int8pack": 1e-3, "int4pack": 1e-3, "int4pack-cuda": 0.02, "inductor": 1e-5,
             "inductor-int8": 1e-5, "inductor-int8-words": 1e-5,
             "native-int8": 1e-5, "native-int4": 1e-5, "fbgemm": 0.05, "fbgemm-groups": 0.05}


def candidates(scheme: Scheme, device: torch.device, out_features: int, in_features: int) -> list[str]:
    return [name for name, cls in KERNELS.items() if cls.available(scheme, device, out_features, in_features)]


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def _time_call(fn, device: torch.device, calls: int = 20, repeats: int = 5) -> float:
    """Median seconds per call, after warm-up."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def benchmark_kernels(scheme: Scheme, out_features: int, in_features: int, device: torch.device) -> dict[str, float | None]:
    """Seconds per one-token call of each candidate kernel on a random layer; None where it is wrong or fails."""
    gen = torch.Generator().manual_seed(0)
    qw = quantize_rtn(torch.randn(out_features, in_features, generator=gen) * 0.02, scheme)
    x = torch.randn(1, in_features, generator=gen).to(device)
    ref = ReferenceLinear(qw, None, device)(x)
    result: dict[str, float | None] = {}
    for name in candidates(scheme, device, out_features, in_features):
        try:
            module = KERNELS[name](qw, None, device)
            # A kernel that could not compile here computes by a fallback and says so by its name.
            ok = relative_error(module(x), ref) <= TOLERANCE[name] and module.kernel == name
        except (RuntimeError, NotImplementedError):
            ok = False  # e.g. a kernel this build or device lacks
        result[name] = _time_call(lambda: module(x), device) if ok else None
    return result


def choose_kernel(scheme: Scheme, out_features: int, in_features: int, device: torch.device,
                  forced: str | None = None) -> str:
    """The kernel for one layer shape: forced (argument or LEANGPT_QUANT_KERNEL), else leangpt's own C++ kernel
    where it builds (the engine's C++ decode step, leangpt/native_decode.py, reads those layers only, and takes
    the whole one-row step), else the fastest correct weight-only one by a cached one-time micro-benchmark."""
    forced = forced or os.environ.get("LEANGPT_QUANT_KERNEL") or None
    names = candidates(scheme, device, out_features, in_features)
    if forced:
        if forced not in KERNELS:
            raise UserError(f"unknown quantized kernel {forced!r}; choose from {', '.join(KERNELS)}")
        if forced not in names:
            raise UserError(f"kernel {forced!r} cannot run {scheme.name} with {in_features} inputs on {device}")
        return forced
    names = [name for name in names if not KERNELS[name].quantizes_activations]
    own = [name for name in names if name.startswith("native-")]
    if len(names) == 1 or own:
        return (own or names)[0]
    key = f"quant-kernels|{machine_key(device)}|{scheme.name}|{out_features}x{in_features}"
    # Timings from before a candidate existed here (a torch upgrade, a new kernel) are measured again.
    timings = cached(key, lambda: benchmark_kernels(scheme, out_features, in_features, device),
                     accept=lambda stored: isinstance(stored, dict) and set(names) <= set(stored))
    timings = {k: v for k, v in timings.items() if v is not None and k in names}
    return min(timings, key=timings.get) if timings else "reference"


def build_linear(qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device,
                 forced: str | None = None) -> QuantLinear:
    """The quantized module for one layer, on the kernel chosen for its shape on this device."""
    return KERNELS[choose_kernel(qw.scheme, qw.out_features, qw.in_features, device, forced)](qw, bias, device)
