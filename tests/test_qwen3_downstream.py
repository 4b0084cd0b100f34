"""Every stage after training on a model of the default recipe's kind (tiny-qwen3, cpu-5min's architecture:
RoPE, RMSNorm, QK-norm, SwiGLU, untied head, no biases, zero-initialised projections) trained with Muon. Quantization,
pruning of each kind, distillation, speculative decoding and serve, through the commands a user runs."""

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from leangpt import hf
from leangpt.checkpoint import load_checkpoint
from leangpt.engine import Engine, Request
from leangpt.evaluate import EvalSettings, evaluate
from leangpt.pruning import unstructured
from leangpt.sampling import SamplingConfig
from leangpt.serve import create_app
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory, dataset_dir) -> Path:
    from leangpt.train import TrainConfig, train

    out = tmp_path_factory.mktemp("qwen3") / "dense"
    cfg = TrainConfig(preset="tiny-qwen3", max_steps=40, batch_size=8, eval_every=0, precision="fp32")
    assert cfg.optimizer == "muon"  # the default
    train(cfg, dataset_dir, out, progress=False)
    return out


def val_bpb(model_dir: Path, data: Path) -> float:
    return evaluate(EvalSettings(model=model_dir, data=data, max_tokens=2048, progress=False))["bits_per_byte"]


def generates(model_dir: Path, capsys, *extra: str) -> str:
    code, out, err = run_cli(["generate", "--model", str(model_dir), "--prompt", "The king", "--max-new-tokens", "8",
                              "--temperature", "0", "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)["text"]


def test_the_checkpoint_is_a_qwen3_that_transformers_loads(qwen3_checkpoint):
    from transformers import AutoModelForCausalLM

    model, _, _ = load_checkpoint(qwen3_checkpoint)
    assert hf.hf_model_type(model.config) == "qwen3"
    theirs = AutoModelForCausalLM.from_pretrained(qwen3_checkpoint).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["int8", "int4", "gptq-int4"])
def test_quantized_variants_stay_close_and_generate(qwen3_checkpoint, dataset_dir, tmp_path, capsys, method):
    out = tmp_path / method
    calib = ["--calib-data", str(dataset_dir), "--calib-samples", "8"] if method.startswith("gptq") else []
    code, _, err = run_cli(["quantize", "--model", str(qwen3_checkpoint), "--method", method, "--out", str(out),
                            *calib], capsys)
    assert code == 0, err
    dense = val_bpb(qwen3_checkpoint, dataset_dir)
    assert abs(val_bpb(out, dataset_dir) - dense) < {"int8": 0.01, "int4": 0.15, "gptq-int4": 0.1}[method] * dense
    assert generates(out, capsys)


def test_unstructured_and_nm_pruning(qwen3_checkpoint, dataset_dir, tmp_path, capsys):
    common = ["--model", str(qwen3_checkpoint), "--calib-data", str(dataset_dir), "--calib-samples", "8"]
    code, _, err = run_cli(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w"), *common],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["prune", "--method", "sparsegpt", "--pattern", "2:4", "--out", str(tmp_path / "s"),
                            *common], capsys)
    assert code == 0, err
    for name in ("w", "s"):
        model, _, _ = load_checkpoint(tmp_path / name)
        linears = unstructured.block_linears(model)
        assert len(linears) == 2 * 5  # qkv, attention out, gate, up, down in each block
        for lin in linears.values():
            assert float((lin.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
        assert generates(tmp_path / name, capsys)


def test_structured_pruning_of_qk_normed_heads_and_an_untied_head(qwen3_checkpoint, dataset_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "small"
    code, _, err = run_cli(["prune", "--model", str(qwen3_checkpoint), "--method", "structured", "--heads", "0.5",
                            "--neurons", "0.5", "--calib-data", str(dataset_dir), "--calib-samples", "8",
                            "--recover-steps", "3", "--set", "batch_size=4", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    model, _, _ = load_checkpoint(out)
    assert model.config.n_head == 1 and not model.config.tie_embeddings and model.config.qk_norm  # 1 of 2 per layer
    assert model.num_params() < load_checkpoint(qwen3_checkpoint)[0].num_params()
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()  # uniform head counts: still a qwen3 directory
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model.eval()(x), atol=1e-5, rtol=0)
    assert generates(out, capsys)


def test_distilled_student_of_a_qwen3_teacher(qwen3_checkpoint, dataset_dir, tmp_path, capsys):
    out = tmp_path / "student"
    code, stdout, err = run_cli(["distill", "--teacher", str(qwen3_checkpoint), "--data", str(dataset_dir),
                                 "--out", str(out), "--student-layers", "1", "--set", "max_steps=5",
                                 "--set", "batch_size=2", "--set", "eval_tokens=256", "--json"], capsys)
    assert code == 0, err
    student, _, meta = load_checkpoint(out)
    assert student.config.n_layer == 1 and student.config.qk_norm and meta["kind"] == "distill"
    assert hf.hf_model_type(student.config) == "qwen3"


def test_speculative_decoding_with_a_qwen3_draft_equals_the_target(qwen3_checkpoint, dataset_dir, tmp_path, capsys):
    draft = tmp_path / "draft"
    code, _, err = run_cli(["quantize", "--model", str(qwen3_checkpoint), "--method", "int8", "--out", str(draft)],
                           capsys)
    assert code == 0, err
    assert generates(qwen3_checkpoint, capsys, "--draft", str(draft)) == generates(qwen3_checkpoint, capsys)


def test_compiled_engine_and_serve_give_the_eager_engines_text(qwen3_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANGPT_CACHE_DIR", str(tmp_path / "cache"))
    model, tokenizer, _ = load_checkpoint(qwen3_checkpoint)
    prompt = tokenizer.encode("The king")
    request = Request(prompt, 10, SamplingConfig(temperature=0), None, (tokenizer.eos_id,))  # serve stops there too
    [eager] = Engine(model).generate([request])
    [compiled] = Engine(model, compile=True, native=False).generate([request])
    assert compiled.tokens == eager.tokens
    with TestClient(create_app(Engine(model), tokenizer, "qwen3")) as client:
        r = client.post("/v1/completions", json={"model": "qwen3", "prompt": "The king", "max_tokens": 10,
                                                 "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tokenizer.decode(eager.tokens)
