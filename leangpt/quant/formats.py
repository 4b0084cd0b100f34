"""The device-independent form of a quantized weight: integers, scales and zero points, and RTN.

Schemes (one per checkpoint, named in leangpt.json):

- int8: per output channel, symmetric. W ≈ q · s, q ∈ [-127, 127] int8 (out, in), s (out,).
- int4: group-wise along the input dimension, asymmetric. W ≈ (q - z) · s with q ∈ [0, 15] and an
  integer zero point z ∈ [0, 15] per (row, group); scales and zeros (out, G). Two 4-bit values are packed
  per byte (even column in the low nibble). When in_features is not a multiple of the group size the
  last group is shorter (G = ceil(in / group_size)); no padding is stored.

An int4 scheme may also round each product's inputs ("activations": "int8", `round_activations`): per group of
the weight's groups, x ≈ round(x / s) · s with s = max |x| / 127, as llama.cpp's CPU dot products of Q4 weights
do (Q8 activations). The products are then integer within a group (leangpt's C++ one-row kernel: a batch-1 decode
step in 0.65-0.72x the time on a 2-core AVX2 EPYC), and every kernel computes the same function: the weight-only
kernels from the rounded floats. An int8 scheme's "int8" activations ("int8-a8", w8a8) are rounded with one scale
per input row (each token's vector), as torchao's and SmoothQuant's dynamic per-token int8: the C++ products are
then integer over the whole row (VNNI's byte dot product where the CPU has it).

Every kernel in leangpt.quant.kernels is tested against `dequantize()` followed by a plain matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leangpt.errors import UserError

SCHEMES = ("int8", "int4")
ACTIVATIONS = ("float", "int8")


@dataclass(frozen=True)
class Scheme:
    bits: int  # 8 or 4
    group_size: int | None = None  # int4 only
    activations: str = "float"  # "int8": products round their inputs (round_activations, activation_group)

    def __post_init__(self) -> None:
        if self.bits == 8 and self.group_size is not None:
            raise UserError("int8 is per output channel; a group size applies to int4 only")
        if self.bits == 4 and (self.group_size is None or self.group_size < 2 or self.group_size % 2):
            raise UserError(f"int4 needs an even group size >= 2 (32, 64, 128 are usual), got {self.group_size}")
        if self.bits not in (4, 8):
            raise UserError(f"bits must be 4 or 8, got {self.bits}")
        if self.activations not in ACTIVATIONS:
            raise UserError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")

    @property
    def name(self) -> str:
        a8 = "-a8" if self.activations == "int8" else ""
        return "int8" + a8 if self.bits == 8 else f"int4-g{self.group_size}{a8}"

    def activation_group(self, in_features: int) -> int:
        """Inputs that share one int8 scale when activations are int8: int4's weight group, int8's whole row."""
        return self.group_size if self.bits == 4 else in_features

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "activations": self.activations}

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        return cls(int(d["bits"]), d.get("group_size"), d.get("activations", "float"))


def round_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (..., in) rounded to int8 per group of `group_size` inputs (a shorter last group): round(x / s) · s,
    s = max |x| / 127 over the group (1 where it is all zeros), ties to even. The C++ kernels round the same way
    (native_rows.h, round_activations)."""
    n = x.shape[-1]
    xf = F.pad(x.float(), (0, -n % group_size)).unflatten(-1, (-1, group_size))
    s = xf.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(xf / s) * s).flatten(-2)[..., :n].to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in [0, 15] -> (out, ceil(in/2)) uint8, even column in the low nibble."""
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4: (out, in) uint8 in [0, 15]."""
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return q[:, :in_features]


@dataclass
class QuantizedWeight:
    """One linear layer's quantized weight, independent of any device kernel."""

    scheme: Scheme
    qweight: torch.Tensor  # int8 (out, in) for int8; uint8 (out, ceil(in/2)) packed for int4
    scales: torch.Tensor  # float32 (out,) for int8; (out, G) for int4
    zeros: torch.Tensor | None  # uint8 (out, G) for int4; None for int8
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def int_weight(self) -> torch.Tensor:
        """The integers, unpacked: int8 (out, in) for int8; uint8 (out, in) in [0, 15] for int4."""
        return self.qweight if self.scheme.bits == 8 else unpack_int4(self.qweight, self.in_features)

    def group_index(self) -> torch.Tensor:
        """Group of each input column (in,)."""
        return torch.arange(self.in_features, device=self.qweight.device) // self.scheme.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the integers stand for: (out, in). The reference every kernel is tested against."""
        if self.scheme.bits == 8:
            return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None])
        g = self.group_index()
        q = self.int_weight().to(dtype)
        return (q - self.zeros[:, g].to(dtype)) * self.scales[:, g].to(dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, scheme: Scheme, tensors: dict[str, torch.Tensor], prefix: str,
                     in_features: int, out_features: int) -> "QuantizedWeight":
        try:
            qw = cls(scheme, tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"].float(),
                     tensors.get(f"{prefix}.zeros"), in_features)
        except KeyError as e:
            raise UserError(f"model.safetensors: missing quantized tensor {e.args[0]!r}") from None
        qw.check(out_features)
        return qw

    def check(self, out_features: int) -> None:
        """Shapes and dtypes agree with the scheme and the layer (a loud error for a mismatched file)."""
        n_groups = -(-self.in_features // self.scheme.group_size) if self.scheme.bits == 4 else None
        if self.scheme.bits == 8:
            ok = (self.qweight.dtype == torch.int8 and tuple(self.qweight.shape) == (out_features, self.in_features)
                  and tuple(self.scales.shape) == (out_features,) and self.zeros is None)
        else:
            ok = (self.qweight.dtype == torch.uint8
                  and tuple(self.qweight.shape) == (out_features, -(-self.in_features // 2))
                  and tuple(self.scales.shape) == (out_features, n_groups)
                  and self.zeros is not None and self.zeros.dtype == torch.uint8
                  and tuple(self.zeros.shape) == (out_features, n_groups))
        if not ok:
            raise UserError(f"model.safetensors: quantized weight does not match {self.scheme.name} "
                            f"for a {self.in_features}->{out_features} layer")

    def nbytes(self) -> int:
        """Stored bytes, scales and zeros included."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN parameters for the rows of w (out, n): int8 symmetric scale (out,), or int4 asymmetric
    scale and integer zero point (out,). The range always includes 0 so that zeros stay exact."""
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integers for w (out, ...) given per-row scale and zero (out,)."""
    if bits == 8:
        return torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127)
    shape = (-1, *[1] * (w.dim() - 1))
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, 15)


def from_integers(scheme: Scheme, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> QuantizedWeight:
    """Build the stored form from unpacked integers (out, in) and float scales / zeros."""
    in_features = q.shape[1]
    if scheme.bits == 8:
        return QuantizedWeight(scheme, q.to(torch.int8).contiguous(), scales.float().contiguous(), None, in_features)
    return QuantizedWeight(scheme, pack_int4(q).contiguous(), scales.float().contiguous(),
                           zeros.to(torch.uint8).contiguous(), in_features)


def quantize_rtn(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest: each row (int8) or each row's group of columns (int4) on its own grid."""
    w = w.detach().float()
    if scheme.bits == 8:
        scale, _ = group_params(w, 8)
        return from_integers(scheme, quantize_column(w, scale, None, 8), scale, None)
    out, n = w.shape
    g = scheme.group_size
    qs, scales, zeros = [], [], []
    for start in range(0, n, g):
        block = w[:, start:start + g]
        scale, zero = group_params(block, 4)
        qs.append(quantize_column(block, scale, zero, 4))
        scales.append(scale)
        zeros.append(zero)
    return from_integers(scheme, torch.cat(qs, 1), torch.stack(scales, 1), torch.stack(zeros, 1))
