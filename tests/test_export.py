"""`leangpt export`: GGUF files checked in llama.cpp and ONNX directories in onnxruntime, against leangpt."""

from __future__ import annotations

import json

import gguf
import llama_cpp  # noqa: F401  (installed by scripts/test.sh: these tests run against the real runtime)
import numpy as np
import pytest
import torch

from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.config import ModelConfig
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Engine, Request
from leangpt.errors import UserError
from leangpt.export import ExportSettings, export
from leangpt.export.gguf_file import exact_blocks
from leangpt.export.runtimes import LlamaCppModel, OnnxModel, gguf_speed, greedy, onnx_speed
from leangpt.model import GPT
from leangpt.quant.formats import Scheme, quantize_rtn
from leangpt.quantize import QuantizeSettings, quantize
from leangpt.sampling import SamplingConfig
from tests.conftest import run_cli

LLAMA_GQA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_head=4, n_kv_head=2, tie_embeddings=False)
QWEN3 = dict(LLAMA_GQA, qk_norm=True, head_dim=32)  # QK-norm, and heads wider than n_embd / n_head
NANOCHAT = dict(LLAMA_GQA, mlp="relu2", qk_norm=True, norm_weight=False, embed_norm=True, logit_softcap=0.5)
TEXT = "Der König sprach: « café, naïve, Æsir » — 東京で寿司を食べた 🍣🎉👩‍👩‍👧 ünïcödé   spaces\n\ttabs  end"
PROMPT = "The king speaks with the queen before the night"


def trained(tmp_path_factory, dataset_dir, name: str, options: dict):
    from leangpt.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / name
    train(TrainConfig(preset="tiny", optimizer="adamw", max_steps=40, batch_size=8, eval_every=0, lr=3e-3, model=options),
          dataset_dir, out, progress=False)
    return out


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory, dataset_dir):
    """A tiny trained llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head."""
    return trained(tmp_path_factory, dataset_dir, "llama", LLAMA_GQA)


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory, dataset_dir):
    """The same with Qwen3's per-head QK-norm (trained, so its weights are not ones)."""
    return trained(tmp_path_factory, dataset_dir, "qwen3", QWEN3)


@pytest.fixture(params=["gpt2", "llama", "qwen3"])
def checkpoint(request, tiny_checkpoint, llama_checkpoint, qwen3_checkpoint):
    return {"gpt2": tiny_checkpoint, "llama": llama_checkpoint, "qwen3": qwen3_checkpoint}[request.param]


def export_to(model, out, fmt="gguf", type="auto"):
    return export(ExportSettings(model=model, format=fmt, out=out, type=type, progress=False))


def leangpt_logits(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def leangpt_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    return Engine(model).generate([Request(prompt, n, SamplingConfig(temperature=0))])[0].tokens


def kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(reference || other) of the next-token distributions, in nats."""
    p = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    q = torch.log_softmax(torch.from_numpy(other).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def val_windows(dataset_dir, n: int = 6, length: int = 64) -> list[list[int]]:
    tokens = Dataset(dataset_dir).tokens("val")
    return [tokens[i * length:(i + 1) * length].tolist() for i in range(n)]


def llama_cpp_logits(path, rows: list[list[int]]) -> np.ndarray:
    with LlamaCppModel(path, n_ctx=len(rows[0])) as model:
        out = []
        for row in rows:
            model.reset()
            out.append(model.forward([row], 0, all_logits=True)[0])
    return np.stack(out)


# ---------------------------------------------------------------- GGUF in llama.cpp

def test_llama_cpp_tokenizes_as_leangpt(tiny_checkpoint, tmp_path):
    path = tmp_path / "m.gguf"
    export_to(tiny_checkpoint, path)
    tokenizer = TextTokenizer.load(tiny_checkpoint)
    with LlamaCppModel(path, n_ctx=64) as model:
        assert model.tokenize(TEXT) == tokenizer.encode(TEXT)
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_id
    assert not bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])


def test_gguf_f32_logits_and_greedy_match_leangpt(checkpoint, tmp_path):
    path = tmp_path / "m.gguf"
    result = export_to(checkpoint, path)
    assert result["type"] == "f32" and not path.with_name(f".{path.name}.tmp").exists()
    model, tokenizer, _ = load_checkpoint(checkpoint)
    prompt = tokenizer.encode(PROMPT)
    ours = leangpt_logits(model, prompt)
    theirs = llama_cpp_logits(path, [prompt])[0]
    # ggml's CPU GELU reads a table of fp16 inputs, so GPT-2 is only ~1e-4 close; SiLU models agree to ~1e-6.
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
    with LlamaCppModel(path, n_ctx=64) as llm:
        continuation, _, _ = greedy(llm, [prompt], 24)
    assert continuation[0] == leangpt_greedy(model, prompt, 24)


@pytest.mark.parametrize("type_name, min_top1, max_kl", [("f16", 0.99, 1e-4), ("q8_0", 0.99, 1e-3), ("q4_0", 0.9, 3e-2)])
def test_gguf_quantized_types_agree_with_leangpt(checkpoint, dataset_dir, tmp_path, type_name, min_top1, max_kl,
                                                 record_property):
    path = tmp_path / "m.gguf"
    result = export_to(checkpoint, path, type=type_name)
    assert result["type"] == type_name and type_name in result["tensor_types"]
    model, _, _ = load_checkpoint(checkpoint)
    rows = val_windows(dataset_dir)
    ours = np.stack([leangpt_logits(model, r) for r in rows])
    theirs = llama_cpp_logits(path, rows)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    divergence = kl(ours, theirs)
    record_property("top1", top1)
    record_property("kl", divergence)
    print(f"{checkpoint.name} {type_name}: top-1 agreement {top1:.4f}, KL {divergence:.2e} nats")
    assert top1 >= min_top1 and divergence < max_kl


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, llama_checkpoint):
    """int8 and int4 (groups of 32, head quantized too) variants of the llama-style model."""
    out = tmp_path_factory.mktemp("quant")
    for name, method, group, head in (("int8", "int8", 64, False), ("int4", "int4", 32, True)):
        quantize(QuantizeSettings(model=llama_checkpoint, out=out / name, method=method, group_size=group,
                                  quantize_head=head, progress=False))
    return out


@pytest.mark.parametrize("scheme, gguf_type", [("int8", "q8_0"), ("int4", "q4_1")])
def test_quantized_checkpoint_keeps_its_integers(quantized, dataset_dir, tmp_path, monkeypatch, scheme, gguf_type):
    ckpt = quantized / scheme
    path = tmp_path / "m.gguf"
    result = export_to(ckpt, path)
    layers = json.loads((ckpt / "leangpt.json").read_text())["quantization"]["layers"]
    tensors = sum(3 if name.endswith("attn.qkv") else 1 for name in layers)  # llama's QKV is three GGUF tensors
    assert result["type"] == gguf_type and result["kept_integers"] == tensors and not result["requantized"]
    monkeypatch.setenv("LEANGPT_QUANT_KERNEL", "reference")  # leangpt's dequantize-then-matmul
    model, _, _ = load_checkpoint(ckpt)
    rows = val_windows(dataset_dir, n=3)
    ours = np.stack([leangpt_logits(model, r) for r in rows])
    theirs = llama_cpp_logits(path, rows)
    # What remains is llama.cpp rounding activations to 8 bits per block in its quantized matmuls.
    assert kl(ours, theirs) < 2e-5 and (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
    requantized = export_to(ckpt, tmp_path / "q40.gguf", type="q4_0")
    assert len(requantized["requantized"]) == tensors and requantized["kept_integers"] == 0


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_exact_blocks_hold_the_stored_weight(bits, group):
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(48, 256) * 0.05, Scheme(bits, group))
    blocks = exact_blocks(qw)
    qtype = gguf.GGMLQuantizationType.Q8_0 if bits == 8 else gguf.GGMLQuantizationType.Q4_1
    restored = gguf.quants.dequantize(blocks, qtype)
    expected = qw.dequantize().numpy()
    # Only the scales (and Q4_1's minimum, -zero x scale) are rounded, to fp16 (relative error 2^-11): at most
    # the largest integer (127; or q + z <= 30) times a step times 2^-11.
    largest = 127 if bits == 8 else 30
    np.testing.assert_allclose(restored, expected, atol=largest * qw.scales.max().item() * 2 ** -11, rtol=0)


# ---------------------------------------------------------------- ONNX in onnxruntime

def test_onnx_logits_with_and_without_cache_and_greedy(checkpoint, tmp_path):
    out = tmp_path / "onnx"
    export_to(checkpoint, out, fmt="onnx")
    assert {"model.onnx", "tokenizer.json", "config.json", "leangpt.json"} <= {p.name for p in out.iterdir()}
    model, tokenizer, _ = load_checkpoint(checkpoint)
    prompt = tokenizer.encode(PROMPT)
    ours = leangpt_logits(model, prompt)
    runner = OnnxModel(out)
    np.testing.assert_allclose(runner.forward([prompt], 0, all_logits=True)[0], ours, atol=1e-4, rtol=0)
    split = len(prompt) - 4
    steps = [runner.forward([prompt[:split]], 0, all_logits=True)[0]]
    steps += [runner.forward([[t]], split + i, all_logits=True)[0] for i, t in enumerate(prompt[split:])]
    np.testing.assert_allclose(np.concatenate(steps), ours, atol=1e-4, rtol=0)
    continuation, _, _ = greedy(runner, [prompt], 24)
    assert continuation[0] == leangpt_greedy(model, prompt, 24)
    assert TextTokenizer.load(out).encode(TEXT) == tokenizer.encode(TEXT)


def test_onnx_dynamic_batch_and_int8(llama_checkpoint, dataset_dir, tmp_path):
    model, _, _ = load_checkpoint(llama_checkpoint)
    rows = val_windows(dataset_dir, n=3, length=40)
    ours = np.stack([leangpt_logits(model, r) for r in rows])
    export_to(llama_checkpoint, tmp_path / "f32", fmt="onnx")
    np.testing.assert_allclose(OnnxModel(tmp_path / "f32").forward(rows, 0, all_logits=True), ours, atol=1e-4, rtol=0)
    result = export_to(llama_checkpoint, tmp_path / "int8", fmt="onnx", type="int8")
    theirs = OnnxModel(tmp_path / "int8").forward(rows, 0, all_logits=True)
    assert result["type"] == "int8" and kl(ours, theirs) < 1e-3 and (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


def test_batches_and_speed_helpers(llama_checkpoint, dataset_dir, tmp_path):
    """Rows as parallel llama.cpp sequences decode as leangpt decodes each; the speed helpers the pipeline calls."""
    export_to(llama_checkpoint, tmp_path / "m.gguf")
    export_to(llama_checkpoint, tmp_path / "onnx", fmt="onnx")
    model, _, _ = load_checkpoint(llama_checkpoint)
    prompts = val_windows(dataset_dir, n=3, length=12)
    with LlamaCppModel(tmp_path / "m.gguf", n_ctx=32, n_seq=3) as llm:
        continuations, _, _ = greedy(llm, prompts, 12)
    assert continuations == [leangpt_greedy(model, p, 12) for p in prompts]
    for result in (gguf_speed(tmp_path / "m.gguf", batch=2, prompt_tokens=8, new_tokens=4, repeats=1),
                   onnx_speed(tmp_path / "onnx", model.config.vocab_size, batch=2, prompt_tokens=8, new_tokens=4,
                              repeats=1)):
        assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0 and result["batch"] == 2


# ---------------------------------------------------------------- what is refused, and how

def save_random(directory, tokenizer_dir, **config) -> None:
    tokenizer = TextTokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                                        **config))
    directory.mkdir()
    save_checkpoint(directory, model, tokenizer, {})


@pytest.mark.parametrize("options, gguf", [
    (dict(LLAMA_GQA, bias=True, tie_embeddings=True), True),  # biases on q/k are reordered with their rows
    (dict(LLAMA_GQA, layer_n_head=[2, 2], layer_intermediate_size=[96, 96]), True),
    (NANOCHAT, False)],  # no llama.cpp architecture; ONNX runs every option
    ids=["llama-bias-tied", "llama-pruned-alike", "nanochat"])
def test_model_options_in_the_runtimes(tiny_checkpoint, tmp_path, options, gguf):
    ckpt = tmp_path / "ckpt"
    save_random(ckpt, tiny_checkpoint, **options)
    model, _, _ = load_checkpoint(ckpt)
    ids = list(range(1, 40))
    ours = leangpt_logits(model, ids)
    if gguf:
        export_to(ckpt, tmp_path / "m.gguf")
        np.testing.assert_allclose(llama_cpp_logits(tmp_path / "m.gguf", [ids])[0], ours, atol=1e-4, rtol=0)
    else:
        with pytest.raises(UserError, match="--format onnx"):
            export_to(ckpt, tmp_path / "m.gguf")
    export_to(ckpt, tmp_path / "onnx", fmt="onnx")
    np.testing.assert_allclose(OnnxModel(tmp_path / "onnx").forward([ids], 0, all_logits=True)[0], ours,
                               atol=1e-4, rtol=0)


def test_per_layer_widths_refused_by_gguf_but_run_in_onnx(tiny_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "pruned"
    save_random(ckpt, tiny_checkpoint, layer_intermediate_size=[128, 256], **LLAMA_GQA)
    code, _, err = run_cli(["export", "--model", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "per-layer" in err and "--scope layer" in err and "--format onnx" in err
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []
    export_to(ckpt, tmp_path / "onnx", fmt="onnx")
    model, _, _ = load_checkpoint(ckpt)
    ids = list(range(1, 30))
    np.testing.assert_allclose(OnnxModel(tmp_path / "onnx").forward([ids], 0, all_logits=True)[0],
                               leangpt_logits(model, ids), atol=1e-4, rtol=0)


def test_gpt2_with_pruned_heads_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "heads"
    save_random(ckpt, tiny_checkpoint, layer_n_head=[1, 1])
    with pytest.raises(UserError, match="--heads 0"):
        export_to(ckpt, tmp_path / "m.gguf")


def test_unknown_pre_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "other_tokenizer"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.is_file():
            (ckpt / f.name).write_bytes(f.read_bytes())
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="pre-tokenizer"):
        export_to(ckpt, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*m.gguf*"))


def test_output_errors_are_one_line_and_leave_nothing(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    base = ["export", "--model", str(tiny_checkpoint)]
    for args in (["--format", "gguf", "--out", str(blocker / "m.gguf")],
                 ["--format", "onnx", "--out", str(blocker / "onnx")],
                 ["--format", "gguf", "--out", str(blocker)],
                 ["--format", "gguf", "--type", "int8", "--out", str(tmp_path / "m.gguf")],
                 ["--format", "onnx", "--type", "q8_0", "--out", str(tmp_path / "onnx")]):
        code, _, err = run_cli(base + args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, stdout, _ = run_cli(["export", "--model", str(tiny_checkpoint), "--format", "gguf", "--type", "q8_0",
                               "--out", str(out), "--json"], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["architecture"] == "gpt2" and result["size_bytes"] == out.stat().st_size
    code, stdout, _ = run_cli(["export", "--model", str(tiny_checkpoint), "--format", "gguf", "--out", str(out)], capsys)
    assert code == 2  # exists; --overwrite replaces it
    code, stdout, _ = run_cli(["export", "--model", str(tiny_checkpoint), "--format", "gguf", "--out", str(out),
                               "--overwrite"], capsys)
    assert code == 0 and "f32" in stdout
