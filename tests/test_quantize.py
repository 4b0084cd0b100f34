"""Quantization: formats and kernels against dequantize-then-matmul, GPTQ against RTN, kernel choice,
and the `leangpt quantize` checkpoint through load, eval --reference and generate."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli
from leangpt.checkpoint import load_checkpoint, load_model
from leangpt.errors import UserError
from leangpt.generate import SamplingConfig, generate_ids
from leangpt.quant import kernels, native
from leangpt.quant.formats import QuantizedWeight, Scheme, pack_int4, quantize_rtn, round_activations, unpack_int4
from leangpt.quant.gptq import gptq_quantize
from leangpt.quant.kernels import EAGER_DEQUANT_ROWS, KERNELS, TOLERANCE, candidates, choose_kernel, relative_error
from leangpt.quant.model import kernels_used

CPU = torch.device("cpu")
SCHEMES = [Scheme(8), Scheme(4, 32), Scheme(4, 64), Scheme(4, 48)]


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """This module measures kernels into its own cache, and no forced kernel leaks in from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANGPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("LEANGPT_QUANT_KERNEL", raising=False)
        yield


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(96, 128), (40, 100), (64, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_kernel_equals_dequantize_then_matmul(scheme, shape):
    out_f, in_f = shape  # 100 and 7 are not multiples of any group size: the last group is shorter
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    qw = quantize_rtn(w, scheme)
    x = torch.randn(2, 5, in_f, generator=gen)
    ref = F.linear(x, qw.dequantize(), bias)
    names = candidates(scheme, CPU, out_f, in_f)
    assert "reference" in names
    for name in names:
        y = KERNELS[name](qw, bias, CPU)(x)
        assert y.shape == (2, 5, out_f)
        assert relative_error(y, ref) <= TOLERANCE[name], name
    # the quantization itself is close to the float weight (4 bits: coarse; 8 bits: fine)
    assert relative_error(qw.dequantize(), w) < (0.12 if scheme.bits == 4 else 0.01)


@pytest.mark.parametrize("kernel,shape,group", [
    ("inductor", (96, 128), 64), ("inductor", (40, 100), 64), ("inductor", (64, 7), 48), ("inductor", (24, 200), 32),
    ("inductor", (48, 256), 128), ("inductor-int8", (96, 128), None), ("inductor-int8", (40, 100), None),
    ("inductor-int8", (7, 33), None), ("inductor-int8-words", (96, 128), None),
    ("inductor-int8-words", (40, 100), None), ("inductor-int8-words", (7, 33), None),
    ("native-int4", (96, 128), 64), ("native-int4", (40, 100), 64), ("native-int4", (24, 200), 32),
    ("native-int4", (48, 256), 128), ("native-int4", (5, 7), 32), ("native-int8", (96, 128), None),
    ("native-int8", (40, 100), None), ("native-int8", (7, 33), None)], ids=lambda v: str(v))
def test_fused_kernels_equal_dequantize_then_matmul(kernel, shape, group):
    """The fused kernels (one row: decode at batch 1; a few rows: speculative verification, small batches) and
    their many-row route equal dequantize-then-matmul, for 4-bit groups of 32/48/64/128 also where in_features
    is not a multiple of the group size (100, 7, 200) or odd (7), and for int8 on odd sizes."""
    scheme = Scheme(8) if group is None else Scheme(4, group)
    if kernel not in candidates(scheme, CPU, *shape):
        pytest.skip(f"no {kernel} kernel on this device")
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(1)
    qw = quantize_rtn(torch.randn(out_f, in_f, generator=gen), scheme)
    bias = torch.randn(out_f, generator=gen)
    module = KERNELS[kernel](qw, bias, CPU)
    few = module.gemv_rows
    many = (2, EAGER_DEQUANT_ROWS // 2 + 1, in_f)  # eval-sized: dequantized uncompiled
    # 3, 6, 7 rows: the C++ kernels' groups of four, two and one input rows
    for rows in [(1, in_f), (1, 1, in_f), (3, 1, in_f), (6, in_f), (7, in_f), (few, in_f), (few + 1, in_f), (2, 9, in_f),
                 many]:
        x = torch.randn(*rows, generator=gen)
        y = module(x)
        assert module.kernel == kernel  # compiled, not fallen back
        assert relative_error(y, F.linear(x, qw.dequantize(), bias)) <= TOLERANCE[kernel], rows
    assert module(torch.randn(1, in_f, dtype=torch.bfloat16)).dtype == torch.bfloat16
    if shape == (40, 100):  # inside a whole-model torch.compile the same tensor ops are traced, not called
        torch._dynamo.reset()  # each kernel's module recompiles QuantLinear.forward: stay below the recompile limit
        for n in (1, few + 1):
            x = torch.randn(n, in_f, generator=gen)
            y = torch.compile(module, fullgraph=True, dynamic=False)(x)
            assert relative_error(y, F.linear(x, qw.dequantize(), bias)) <= TOLERANCE[kernel]


@pytest.mark.parametrize("kernel,scheme", [("inductor", Scheme(4, 32)), ("inductor-int8", Scheme(8)),
                                           ("inductor-int8-words", Scheme(8))], ids=["int4", "int8", "int8-words"])
def test_fused_kernel_falls_back_when_it_cannot_compile(monkeypatch, kernel, scheme):
    import torch._inductor.compile_fx as compile_fx

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compile_fx, "compile_fx", no_compiler)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    qw = quantize_rtn(torch.randn(16, 40), scheme)
    module = KERNELS[kernel](qw, None, CPU)
    x = torch.randn(1, 40)
    with pytest.warns(UserWarning, match="could not be compiled") as caught:
        y = module(x)
    # Named for what runs: the layer's own dequantize of its stored integers, uncompiled (not `reference`).
    assert f"{kernel}-eager" in str(caught[0].message) and "reference" not in str(caught[0].message)
    assert module.kernel == f"{kernel}-eager" and kernels_used(nn.Sequential(module)) == {f"{kernel}-eager": 1}
    assert relative_error(y, F.linear(x, qw.dequantize())) <= 1e-5
    timings = kernels.benchmark_kernels(scheme, 16, 40, CPU)
    assert timings[kernel] is None and timings["reference"] is not None


def test_native_kernels_drop_out_when_they_cannot_be_built(monkeypatch):
    """No compiler (or a build error): one warning, the native kernels are no candidates, the others run."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "_loaded", None)
    with pytest.warns(UserWarning, match="C\\+\\+ kernels could not be built here.*no C\\+\\+ compiler"):
        names = candidates(Scheme(8), CPU, 64, 64)
    assert "native-int8" not in names and "reference" in names
    assert "native-int4" not in candidates(Scheme(4, 32), CPU, 64, 64)
    with pytest.raises(RuntimeError, match="cannot run"):
        KERNELS["native-int8"](quantize_rtn(torch.randn(8, 8), Scheme(8)), None, CPU)


def test_native_build_directory_depends_on_source_torch_and_cpu(monkeypatch):
    first = native.build_directory()
    assert first.parent == native.cache_dir() / "native"
    monkeypatch.setattr(native, "_cpuinfo", lambda: {"model name": "another CPU", "flags": "sse2"})
    native.build_hash.cache_clear()
    try:
        assert native.build_directory() != first
    finally:
        native.build_hash.cache_clear()


def test_int4_packing_round_trip_and_format():
    q = torch.randint(0, 16, (5, 9))
    packed = pack_int4(q)
    assert packed.shape == (5, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 9), q.to(torch.uint8))
    qw = quantize_rtn(torch.randn(5, 9), Scheme(4, 4))
    assert qw.scales.shape == (5, 3) and qw.zeros.shape == (5, 3)  # groups of 4, 4, 1
    assert int(qw.int_weight().max()) <= 15


def test_rtn_keeps_zero_exact_and_bad_schemes_fail():
    w = torch.randn(8, 64)
    w[:, :3] = 0
    for scheme in (Scheme(8), Scheme(4, 32)):
        assert torch.all(quantize_rtn(w, scheme).dequantize()[:, :3] == 0)
    for bits, g in ((4, None), (4, 7), (8, 64), (3, None)):
        with pytest.raises(UserError):
            Scheme(bits, g)
    qw = quantize_rtn(w, Scheme(4, 32))
    with pytest.raises(UserError):
        QuantizedWeight.from_tensors(Scheme(4, 16), qw.tensors("l"), "l", 64, 8)  # wrong group count


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 32)], ids=lambda s: s.name)
def test_gptq_beats_rtn_on_correlated_inputs(scheme):
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = 128, 64
    # Inputs living near a low-dimensional subspace, with a few large features: GPTQ's use case.
    X = torch.randn(4096, 12, generator=gen) @ torch.randn(12, n_in, generator=gen)
    X = X + 0.05 * torch.randn(4096, n_in, generator=gen)
    X[:, :4] *= 8
    H = 2 * X.T @ X / len(X)
    w = torch.randn(n_out, n_in, generator=gen)

    def out_err(qw: QuantizedWeight) -> float:
        return relative_error(X @ qw.dequantize().T, X @ w.T)

    rtn = out_err(quantize_rtn(w, scheme))
    gptq = out_err(gptq_quantize(w, H, scheme, block_size=32))
    act = out_err(gptq_quantize(w, H, scheme, act_order=True))
    assert gptq < 0.7 * rtn and act < 0.7 * rtn, (rtn, gptq, act)


def test_gptq_dead_inputs_and_format():
    H = torch.eye(64)
    H[5, 5] = 0  # input never seen in calibration
    qw = gptq_quantize(torch.randn(16, 64), H, Scheme(4, 32))
    assert qw.dequantize()[:, 5].abs().max() == 0
    assert qw.qweight.dtype == torch.uint8 and qw.scales.shape == (16, 2)


def test_leangpts_own_kernel_is_chosen_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda *a, **k: pytest.fail("measured"))
    for scheme, kernel in ((Scheme(8), "native-int8"), (Scheme(4, 32), "native-int4")):
        if kernel not in candidates(scheme, CPU, 32, 64):
            pytest.skip("leangpt's C++ kernels cannot be built here")
        assert choose_kernel(scheme, 32, 64, CPU) == kernel


def test_kernel_choice_is_measured_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "available", lambda: False)  # else leangpt's own kernel, unmeasured
    scheme = Scheme(8)
    first = choose_kernel(scheme, 32, 64, CPU)
    cache = json.loads((tmp_path / "measurements.json").read_text())
    (timings,) = [v for k, v in cache.items() if k.startswith("quant-kernels|")]
    assert set(timings) == set(candidates(scheme, CPU, 32, 64)) and first in timings

    def no_benchmark(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernels, "benchmark_kernels", no_benchmark)
    assert choose_kernel(scheme, 32, 64, CPU) == first
    monkeypatch.setenv("LEANGPT_QUANT_KERNEL", "reference")
    assert choose_kernel(scheme, 32, 64, CPU) == "reference"
    with pytest.raises(UserError):
        choose_kernel(scheme, 32, 64, CPU, forced="int4pack")  # int4 kernel for int8 weights
    with pytest.raises(UserError):
        choose_kernel(scheme, 32, 64, CPU, forced="nope")


@pytest.mark.parametrize("bits", [8, 4])
def test_automatic_choice_never_quantizes_activations(monkeypatch, tmp_path, bits):
    """FBGEMM's w8a8 kernels are another computation than the weight-only checkpoint: even when they measure
    fastest they run only when forced."""
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path))
    scheme = Scheme(bits, 64 if bits == 4 else None)
    names = candidates(scheme, CPU, 32, 128)
    w8a8 = [n for n in names if KERNELS[n].quantizes_activations]
    if not w8a8:
        pytest.skip("no FBGEMM engine in this torch build")
    monkeypatch.setattr(kernels, "benchmark_kernels",
                        lambda *a, **k: {n: (1e-9 if n in w8a8 else 1.0) for n in names})
    chosen = choose_kernel(scheme, 32, 128, CPU)
    assert chosen in names and not KERNELS[chosen].quantizes_activations
    assert choose_kernel(scheme, 32, 128, CPU, forced=w8a8[0]) == w8a8[0]


def dequantized_twin(float_dir, quant_dir) -> nn.Module:
    """The float model with each quantized layer's weight replaced by its dequantized integers."""
    model = load_model(float_dir)
    meta = json.loads((quant_dir / "leangpt.json").read_text())["quantization"]
    scheme = Scheme.from_dict(meta["scheme"])
    tensors = load_file(str(quant_dir / "model.safetensors"))
    for name in meta["layers"]:
        if name == "tok_emb":  # the (vocab, C) table; a tied head reads the same dequantized table
            qw = QuantizedWeight.from_tensors(scheme, tensors, name, model.config.n_embd, model.config.vocab_size)
            model.tok_emb.weight = nn.Parameter(qw.dequantize())
            if model.config.tie_embeddings:
                model.lm_head.weight = model.tok_emb.weight
            continue
        lin = model.get_submodule(name)
        qw = QuantizedWeight.from_tensors(scheme, tensors, name, lin.in_features, lin.out_features)
        lin.weight = nn.Parameter(qw.dequantize())  # unties a quantized head from the embedding
    return model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_checkpoint, dataset_dir):
    """Quantized tiny checkpoints made by the command line."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, argv in {
        "int8": ["--method", "int8", "--no-quantize-head"],
        # weight-only int4 (float activations), which every kernel computes up to float rounding
        "int4": ["--method", "int4", "--group-size", "32", "--activations", "float"],
        "int4emb": ["--method", "int4", "--group-size", "32", "--quantize-embedding", "--activations", "float"],
        "gptq4": ["--method", "gptq-int4", "--group-size", "32", "--calib-data", str(dataset_dir),
                  "--calib-samples", "16", "--calib-seq-len", "64", "--activations", "float"],
        "gptq4a8": ["--method", "gptq-int4", "--group-size", "32", "--calib-data", str(dataset_dir),
                    "--calib-samples", "16", "--calib-seq-len", "64"],  # the default: int8 activations
        "int8a8": ["--method", "int8", "--activations", "int8"],  # w8a8: each input row rounded to int8
    }.items():
        from leangpt.quantize import main
        assert main(["--model", str(tiny_checkpoint), "--out", str(root / name), *argv]) == 0
        out[name] = root / name
    return out


def test_quantized_checkpoint_format(quantized, tiny_checkpoint):
    meta = json.loads((quantized["int4"] / "leangpt.json").read_text())
    q = meta["quantization"]
    assert q["scheme"] == {"bits": 4, "group_size": 32, "activations": "float"} and "lm_head" in q["layers"]
    assert 4 < q["bits_per_weight"] < 6  # 4 bits + a float scale and a uint8 zero per 32 weights
    tensors = load_file(str(quantized["int4"] / "model.safetensors"))
    assert tensors["blocks.0.mlp.fc.qweight"].dtype == torch.uint8
    assert not any(k.endswith(".weight") and ("attn" in k or "mlp" in k) for k in tensors)
    assert json.loads((quantized["int8"] / "config.json").read_text()) == \
        json.loads((tiny_checkpoint / "config.json").read_text())


def test_quantized_tied_embedding_is_stored_once_and_shrinks_the_file(quantized, tiny_checkpoint):
    q = json.loads((quantized["int4emb"] / "leangpt.json").read_text())["quantization"]
    assert "tok_emb" in q["layers"] and "lm_head" not in q["layers"]  # the tied head reads the same table
    tensors = load_file(str(quantized["int4emb"] / "model.safetensors"))
    assert "tok_emb.weight" not in tensors and tensors["tok_emb.qweight"].dtype == torch.uint8
    size = {k: (quantized[k] / "model.safetensors").stat().st_size for k in ("int4", "int4emb")}
    assert size["int4emb"] < size["int4"]


@pytest.mark.parametrize("which", ["int8", "int4", "int4emb", "gptq4"])
def test_round_trip_and_greedy_text_equal_dequantized_twin(quantized, tiny_checkpoint, which, monkeypatch):
    twin = dequantized_twin(tiny_checkpoint, quantized[which])
    x = torch.randint(0, twin.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = twin(x)
    prompt = [1, 2, 3, 4]
    greedy = SamplingConfig(temperature=0)
    ref_text = list(generate_ids(twin, prompt, 24, greedy))
    # float activations: the same greedy text
    weight_only = {"reference", "int8pack", "int4pack", "inductor", "inductor-int8", "inductor-int8-words",
                   "native-int8", "native-int4"}
    scheme = Scheme(8) if which == "int8" else Scheme(4, 32)
    vocab = twin.config.vocab_size  # a quantized head's shape may rule kernels out
    for kernel in sorted(set(candidates(scheme, CPU, 64, 64)) & set(candidates(scheme, CPU, vocab, 64))):
        monkeypatch.setenv("LEANGPT_QUANT_KERNEL", kernel)
        model = load_model(quantized[which])
        assert set(kernels_used(model)) == {kernel}
        with torch.no_grad():
            assert relative_error(model(x), ref) <= TOLERANCE[kernel], kernel
        if kernel in weight_only:
            assert list(generate_ids(model, prompt, 24, greedy)) == ref_text, kernel


@pytest.mark.parametrize("which,scheme", [("gptq4a8", Scheme(4, 32, "int8")), ("int8a8", Scheme(8, None, "int8"))])
def test_int8_activations_are_the_default_for_int4_and_every_kernel_rounds_them(quantized, tiny_checkpoint,
                                                                                 monkeypatch, which, scheme):
    """An int4 checkpoint made without --activations rounds each product's inputs to int8 per group, an int8 one
    made with `--activations int8` per input row. Every kernel computes that function: the dequantized twin
    with its layers' inputs rounded by round_activations. Where float rounding tips an input across a rounding
    boundary the outputs differ by one step of that grid, so the check is on the typical position, and on all
    of them loosely."""
    meta = json.loads((quantized[which] / "leangpt.json").read_text())["quantization"]
    assert meta["scheme"] == scheme.to_dict() and meta["scheme_name"] == scheme.name
    twin = dequantized_twin(tiny_checkpoint, quantized[which])
    for name in meta["layers"]:
        group = scheme.activation_group(twin.get_submodule(name).in_features)
        twin.get_submodule(name).register_forward_pre_hook(
            lambda _, args, group=group: (round_activations(args[0], group),))
    x = torch.randint(0, twin.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = twin(x)
        plain = dequantized_twin(tiny_checkpoint, quantized[which])(x)  # float activations
    vocab = twin.config.vocab_size
    for kernel in sorted(set(candidates(scheme, CPU, 64, 64)) & set(candidates(scheme, CPU, vocab, 64))):
        if KERNELS[kernel].quantizes_activations:
            continue  # its own (7-bit) activation rounding on top
        monkeypatch.setenv("LEANGPT_QUANT_KERNEL", kernel)
        model = load_model(quantized[which])
        with torch.no_grad():
            y = model(x)
        errors = sorted(float(e) for e in ((y - ref).abs().amax(-1) / ref.abs().amax()).flatten())
        assert errors[len(errors) // 2] <= max(TOLERANCE[kernel], 1e-4) and errors[-1] < 0.03, kernel
        assert relative_error(plain, ref) > 10 * errors[len(errors) // 2]  # the rounding is there to be seen


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("groups", [1, 3, 6])  # 3 groups of 32: a last 32 inputs outside the 64-input steps
def test_native_integer_product_rounds_its_inputs_as_round_activations(group, groups, products):
    gen = torch.Generator().manual_seed(group + groups)
    K = group * groups
    qw = quantize_rtn(torch.randn(37, K, generator=gen) * 0.05, Scheme(4, group, "int8"))  # 37: a partial block
    x = torch.randn(7, K, generator=gen) * 3  # 7 rows: the C++ groups of 4, 2 and 1 rows
    x[1] = 0  # all-zero groups
    # a group on a grid of step 0.5 (max |x| = 63.5 = 127 · 0.5) with every other value halfway: ties to even
    x[2, :group] = (torch.arange(group) - group // 2) * 0.75
    x[2, group - 1] = 63.5
    ref = KERNELS["reference"](qw, None, CPU)(x)  # rounds x by round_activations, then dequantize-then-matmul
    module = KERNELS["native-int4"](qw, None, CPU)
    y = torch.ops.leangpt_native.int4_a8_gemv(x, *module.weights())  # x as it is: the C++ rounds it
    assert relative_error(y, ref) < 1e-5
    assert relative_error(module(x), ref) < 1e-5


@pytest.mark.parametrize("K", [32, 256, 704, 40, 7])  # 40, 7: inputs past the whole 32s
def test_native_int8_product_rounds_each_row_as_round_activations(K, products):
    gen = torch.Generator().manual_seed(K)
    qw = quantize_rtn(torch.randn(37, K, generator=gen) * 0.05, Scheme(8, None, "int8"))  # 37: a partial block
    x = torch.randn(7, K, generator=gen) * 3  # 7 rows: the C++ groups of 4, 2 and 1 rows
    x[1] = 0  # an all-zero row
    x[2] = (torch.arange(K) - K // 2) * 0.75  # a grid of step 0.5 (max |x| = 63.5 = 127 · 0.5): ties to even
    x[2, -1] = 63.5
    module = KERNELS["native-int8"](qw, None, CPU)
    y = torch.ops.leangpt_native.int8_a8_gemv(x, module.q, module.qscales)  # x as it is: the C++ rounds it
    # the exact integer product of the rounded row, times its two scales
    s = x.abs().amax(1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    exact = (torch.round(x / s).double() @ qw.qweight.double().T) * s.double() * qw.scales.double()
    assert relative_error(y, exact.float()) < 1e-6
    ref = KERNELS["reference"](qw, None, CPU)(x)  # rounds x by round_activations, then dequantize-then-matmul
    assert relative_error(module(x), ref) < 1e-5 and relative_error(y, ref) < 1e-5


def test_rounded_activations():
    x = torch.tensor([[0.0] * 4 + [1.0, -2.54, 0.3, 127.0 / 127 * 2.54], [0.0] * 8])
    y = round_activations(x, 4)
    assert torch.equal(y[:, :4], torch.zeros(2, 4)) and torch.equal(y[1], torch.zeros(8))  # all-zero groups
    s = 2.54 / 127
    assert torch.allclose(y[0, 4:], torch.round(x[0, 4:] / s) * s) and y.dtype == x.dtype
    assert torch.equal(round_activations(y, 4), y)  # rounded values round to themselves
    assert round_activations(torch.randn(3, 7), 4).shape == (3, 7)  # a shorter last group
    assert Scheme(8, None, "int8").name == "int8-a8" and Scheme(8, None, "int8").activation_group(40) == 40
    assert Scheme(4, 32, "int8").activation_group(40) == 32


@pytest.mark.parametrize("which,kernel", [("int8", "native-int8"), ("gptq4", "native-int4"), ("int8a8", "native-int8")])
def test_compiled_decode_on_native_kernels_equals_eager(quantized, which, kernel, monkeypatch):
    """The compiled decode steps (one row, several rows) call the C++ operators from the graph: the same greedy
    tokens as the eager engine on the same kernels."""
    from leangpt.engine import Engine, Request

    if kernel not in candidates(Scheme(8) if which.startswith("int8") else Scheme(4, 32), CPU, 64, 64):
        pytest.skip("leangpt's C++ kernels cannot be built here")
    monkeypatch.setenv("LEANGPT_QUANT_KERNEL", kernel)
    model = load_model(quantized[which])
    assert set(kernels_used(model)) == {kernel}
    greedy = SamplingConfig(temperature=0)
    for prompts in ([[1, 2, 3, 4]], [[1, 2, 3, 4], [5, 6, 7]]):
        requests = [Request(p, 16, greedy) for p in prompts]
        eager = [c.tokens for c in Engine(model).generate(requests)]
        torch._dynamo.reset()
        engine = Engine(model, compile=True, native=False)
        assert [c.tokens for c in engine.generate(requests)] == eager and engine.compile_error is None


def test_gptq_checkpoint_is_closer_to_float_than_rtn(quantized, tiny_checkpoint, dataset_dir, capsys, monkeypatch):
    # Compare the stored weights, not the kernels: the measured kernel choice can give int8 FBGEMM's 8-bit
    # activations on one run and a weight-only kernel on the next.
    monkeypatch.setenv("LEANGPT_QUANT_KERNEL", "reference")
    float_model = load_model(tiny_checkpoint)
    from leangpt.data.shards import Dataset
    from leangpt.evaluate import evaluate_tokens
    tokens = Dataset(dataset_dir).tokens("val")
    _, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    kl = {}
    for which in ("int8", "gptq4"):
        r = evaluate_tokens(load_model(quantized[which]), tokens, tokenizer.token_bytes, 64, max_tokens=4096,
                            reference=float_model)
        kl[which] = r["kl"]
        assert 0 < r["kl"] and 0.5 < r["top1_agreement"] <= 1
    assert kl["int8"] < kl["gptq4"]  # 8 bits lose less than 4
    same = evaluate_tokens(float_model, tokens, tokenizer.token_bytes, 64, max_tokens=2048, reference=float_model)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1


def test_eval_reference_cli(quantized, tiny_checkpoint, dataset_dir, capsys):
    code, out, err = run_cli(["eval", "--model", str(quantized["gptq4"]), "--data", str(dataset_dir),
                              "--reference", str(tiny_checkpoint), "--max-tokens", "2048", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"loss", "perplexity", "bits_per_byte", "kl", "top1_agreement"} <= set(result) and result["kl"] > 0


def test_generate_on_quantized_checkpoint(quantized, capsys):
    code, out, err = run_cli(["generate", "--model", str(quantized["int4"]), "--prompt", "The king",
                              "--max-new-tokens", "8", "--seed", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["tokens"] >= 1


def test_quantize_user_errors(quantized, tiny_checkpoint, tmp_path, capsys):
    cases = [
        ["--method", "gptq-int4", "--out", str(tmp_path / "a")],  # no calibration data
        ["--method", "int4", "--group-size", "7", "--out", str(tmp_path / "b")],
        ["--method", "int8", "--out", str(quantized["int8"])],  # exists
    ]
    for argv in cases:
        code, _, err = run_cli(["quantize", "--model", str(tiny_checkpoint), *argv], capsys)
        assert code == 2 and err.count("\n") == 1, err
    code, _, err = run_cli(["quantize", "--model", str(quantized["int8"]), "--method", "int8",
                            "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "already quantized" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_quantized_checkpoint_runs_on_cuda(quantized, tiny_checkpoint):
    twin = dequantized_twin(tiny_checkpoint, quantized["gptq4"]).cuda()
    model = load_model(quantized["gptq4"], "cuda")
    x = torch.randint(0, twin.config.vocab_size, (2, 20), device="cuda")
    with torch.no_grad():
        assert relative_error(model(x), twin(x)) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_every_cuda_kernel_equals_dequantize_then_matmul(scheme):
    cuda = torch.device("cuda")
    out_f, in_f = 264, 384  # int4pack-cuda needs in % 128 == 0 and out % 8 == 0
    gen = torch.Generator().manual_seed(0)
    qw = quantize_rtn(torch.randn(out_f, in_f, generator=gen), scheme)
    bias = torch.randn(out_f, generator=gen)
    names = candidates(scheme, cuda, out_f, in_f)
    assert scheme.bits == 8 or scheme.group_size == 48 or "int4pack-cuda" in names  # tinygemm: 32/64/128/256
    for rows in (1, 7):
        x = torch.randn(rows, in_f, generator=gen).to(cuda)
        ref = F.linear(x, qw.dequantize().to(cuda), bias.to(cuda))
        for name in names:
            assert relative_error(KERNELS[name](qw, bias, cuda)(x), ref) <= TOLERANCE[name], (name, rows)
