"""`leangpt bench`: one record per model and batch size, with figures that agree with the checkpoint."""

import json

import torch
import torch.nn as nn

from leangpt import machine
from leangpt.bench import BenchSettings, bench, count_params, timed_generation, timed_run
from leangpt.checkpoint import load_model
from leangpt.engine import Engine, Generation, Request
from leangpt.sampling import SamplingConfig
from tests.conftest import run_cli

FIELDS = {"model", "batch", "decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s",
          "peak_memory_mb", "size_mb", "params"}


def test_bench_two_models_json(tiny_checkpoint, tmp_path, capsys):
    quantized = tmp_path / "q"
    code, _, err = run_cli(["quantize", "--model", str(tiny_checkpoint), "--method", "int8", "--no-quantize-head",
                            "--out", str(quantized)],  # the tied head stays the embedding: same parameters
                           capsys)
    assert code == 0, err
    code, out, err = run_cli(["bench", "--model", str(tiny_checkpoint), "--model", str(quantized), "--batch", "2",
                              "--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "1", "--threads", "1",
                              "--json"], capsys)
    assert code == 0, err
    records = json.loads(out)
    assert [(r["model"], r["batch"]) for r in records] == [(str(tiny_checkpoint), 2), (str(quantized), 2)]
    model = load_model(tiny_checkpoint)
    size = (tiny_checkpoint / "model.safetensors").stat().st_size / 2**20
    for r in records:
        assert FIELDS <= set(r)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0
        assert r["peak_memory_mb"] > 0 and r["params"] == model.num_params()
        assert r["decode_step"] == "c++"  # the default up to NativeDecoder.max_rows rows
    assert abs(records[0]["size_mb"] - size) < 1e-3 and records[1]["size_mb"] < 0.8 * size
    assert "quantization" not in records[0] and "kernels" not in records[0]
    assert records[1]["quantization"] and sum(records[1]["kernels"].values()) > 0


def test_peak_memory_is_the_record_process_own(tiny_checkpoint, capsys):
    # Linux carries ru_maxrss through fork + exec: a bench run from a large process (the pipeline after
    # training) must not report that process's peak for every model.
    ballast = torch.ones(2**28)  # 1 GiB resident in this process
    ballast += 1
    code, out, err = run_cli(["bench", "--model", str(tiny_checkpoint), "--batch", "1", "--prompt-tokens", "4",
                              "--new-tokens", "2", "--repeats", "1", "--threads", "1", "--no-compile", "--json"],
                           capsys)
    del ballast
    assert code == 0, err
    assert json.loads(out)[0]["peak_memory_mb"] < 1024


def test_params_of_a_swapped_quantized_linear_count_its_weights():
    class Packed(nn.Module):  # a quantized linear keeps no float weight parameter, its bias as a buffer
        in_features, out_features = 8, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.zeros(4))

    model = nn.Sequential(nn.Linear(8, 8), Packed())
    assert count_params(model) == 8 * 8 + 8 + 8 * 4 + 4


def test_bench_user_errors(tiny_checkpoint, tmp_path, capsys):
    for extra, message in ((["--model", str(tmp_path / "nope")], "not found"),
                           (["--model", str(tiny_checkpoint), "--new-tokens", "500"], "exceed the context"),
                           (["--model", str(tiny_checkpoint), "--batch", "0"], "--batch")):
        code, _, err = run_cli(["bench", *extra], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_bench_library_call_names_the_machine(tiny_checkpoint):
    records = bench(BenchSettings(models=[tiny_checkpoint], batches=[1], prompt_tokens=4, new_tokens=3, repeats=1,
                                  threads=1))
    assert [(r["model"], r["batch"]) for r in records] == [(str(tiny_checkpoint), 1)]
    described = records[0]["machine"]
    assert described["cpu"] == machine.cpu_name()
    assert {"cpu_flags", "cores", "memory_gib", "torch", "torch_threads", "python", "platform"} <= set(described)


def test_bench_times_the_step_by_step_path_users_take(tiny_checkpoint, monkeypatch):
    # generate and serve take every step's tokens on the host; a run that syncs only at the end is not measured.
    def no_run(self, sync_every=16):
        raise AssertionError("bench ran Generation.run, a path generate and serve do not take")

    monkeypatch.setattr(Generation, "run", no_run)
    engine = Engine(load_model(tiny_checkpoint))
    ttft, decode = timed_run(engine, batch=2, prompt_tokens=4, new_tokens=5, seed=0)
    assert ttft > 0 and decode > 0
    ttft, decode, gen = timed_generation(engine, [Request([1, 2, 3], 4, SamplingConfig(temperature=0))])
    assert len(gen.completions[0].tokens) == 4 and gen.decode_steps == 3
