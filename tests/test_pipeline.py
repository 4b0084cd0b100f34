"""`leangpt pipeline`: the tiny config end to end on a generated corpus, its report against `leangpt eval`, the
config checks, refusing an existing run, and --resume."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from leangpt import pipeline, report
from leangpt.checkpoint import load_checkpoint
from leangpt.evaluate import evaluate
from tests.conftest import run_cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny.yaml"


def tiny_args(corpus: Path, out: Path) -> list[str]:
    # One bench batch: each (model, batch) is benchmarked in a fresh process, seconds apiece on 2 busy cores.
    return ["--config", str(TINY), "--set", f"data.source={corpus}", "--set", "sample.prompt=The king",
            "--set", "bench.batches=1", "--set", "train.model.n_layer=3", "--out", str(out)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        # The reference kernels: no per-machine kernel timing or compilation in a test (and no cache writes).
        mp.setenv("LEANGPT_QUANT_KERNEL", "reference")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert pipeline.main(tiny_args(corpus_dir, out) + ["--json"]) == 0
    return out, json.loads(buf.getvalue())


def test_tiny_run_writes_every_stage_and_the_report(tiny_run):
    out, results = tiny_run
    variants = ["dense", "int8", "gptq-int4", "pruned", "distilled"]
    assert list(results["variants"]) == variants
    for stage in [*variants, "data", "eval", "bench", "export", "llamacpp", "sample"]:
        assert (out / stage).is_dir(), stage
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary dirs left behind
    assert json.loads((out / "report.json").read_text()) == results
    assert (out / "report.png").stat().st_size > 0
    for name, v in results["variants"].items():
        assert list(v["bench"]) == ["1"], name
        for record in v["bench"].values():
            assert record["decode_tokens_per_s"] > 0 and record["size_mb"] > 0 and record["params"] > 0
    params = {n: v["bench"]["1"]["params"] for n, v in results["variants"].items()}
    assert params["pruned"] < params["dense"] and params["distilled"] < params["dense"]
    sizes = {n: v["bench"]["1"]["size_mb"] for n, v in results["variants"].items()}
    assert sizes["gptq-int4"] < sizes["int8"] < sizes["dense"]
    assert results["sample"]["text"] and results["sample"]["prompt"] == "The king"
    assert set(results["stages"]) == {*variants, "data", "eval", "bench", "export", "llamacpp", "sample"}
    # A nested model override reaches the model, converted from text to an int (--set train.model.n_layer=3).
    assert load_checkpoint(out / "dense")[0].config.n_layer == 3
    # The report states the recipe: the optimizers with their lrs, the tokens seen and the seconds.
    stage = results["variants"]["dense"]["stage"]
    dense_line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- **dense**"))
    assert "with Muon (lr 0.02)" in dense_line and f"{stage['tokens']:,} tokens in" in dense_line
    int4_line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- **gptq-int4**"))
    assert "inputs rounded to int8 per group" in int4_line  # the default int4 scheme, int4-g…-a8
    int8_line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- **int8**"))
    assert "inputs rounded to int8 per input row" in int8_line  # quantize.activations: int8-a8
    assert results["variants"]["int8"]["stage"]["scheme"] == "int8-a8"
    assert len(results["load_average_start"]) == 3 and results["machine"]["cores"] >= 1


def test_every_variant_llama_cpp_runs_is_exported_and_timed(tiny_run):
    out, results = tiny_run
    files = results["gguf"]
    assert set(files) == {"dense.gguf", "dense-q8_0.gguf", "int8.gguf", "gptq-int4.gguf", "pruned.gguf",
                          "distilled.gguf"}
    assert files["dense.gguf"]["type"] == "f32" and files["dense-q8_0.gguf"]["type"] == "q8_0"
    # The quantized variants go to llama.cpp with their own integers: the same weights, nothing requantized.
    for name, gguf_type in (("int8.gguf", "q8_0"), ("gptq-int4.gguf", "q4_1")):
        assert files[name]["type"] == gguf_type and files[name]["same_weights"] and not files[name]["requantized"]
    timed = [name for name, r in files.items() if "refused" not in r]
    assert {"dense.gguf", "int8.gguf", "gptq-int4.gguf"} <= set(timed)
    assert all((out / "export" / name).stat().st_size > 0 for name in timed)
    peer = results["llama_cpp"]  # llama-cpp-python is part of the test set-up: skipping is not passing
    assert set(peer["files"]) == set(timed)
    for name in timed:
        assert peer["files"][name]["1"]["decode_tokens_per_s"] > 0
    report_md = (out / "report.md").read_text()
    assert "## llama.cpp on the same weights" in report_md
    int8_row = next(line for line in report_md.splitlines() if line.startswith("| int8 |"))
    assert f"| {peer['files']['int8.gguf']['1']['decode_tokens_per_s']:,.1f} |" in int8_row


def test_lambada_is_what_eval_gives_and_paired_with_dense(tiny_run):
    out, results = tiny_run
    cfg = pipeline.load_config(TINY, [])
    dense = evaluate(pipeline.lambada_settings(cfg.eval, "auto", out / "dense", out / "data"))
    expected = pipeline.lambada_scores(dense, None)
    assert results["variants"]["dense"]["eval"]["lambada"] == pytest.approx(expected)
    assert expected["passages"] == 20
    for name, v in results["variants"].items():
        scores = v["eval"]["lambada"]
        assert 0 <= scores["acc"] <= 1 and scores["perplexity"] > 1
        assert ("loglik_vs_dense" in scores) == (name != "dense")
    report_md = (out / "report.md").read_text()
    assert "## shakespeare-lambada" in report_md and "Δ word log-likelihood vs dense" in report_md


def test_report_numbers_are_what_eval_gives(tiny_run, capsys):
    out, results = tiny_run
    report_md = (out / "report.md").read_text()
    cfg = pipeline.load_config(TINY, [])
    for name, v in results["variants"].items():
        reference = None if name == "dense" else out / "dense"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LEANGPT_QUANT_KERNEL", "reference")
            expected = evaluate(pipeline.eval_settings(cfg.eval, "auto", out / name, out / "data", reference))
        keys = ("bits_per_byte", "perplexity", "loss", "tokens") + (() if name == "dense" else ("kl", "top1_agreement"))
        for key in keys:
            assert v["eval"][key] == pytest.approx(expected[key], rel=1e-9), (name, key)
        row = next(line for line in report_md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{expected['bits_per_byte']:.4f}" and cells[4] == f"{expected['perplexity']:.2f}"
        assert cells[5] == ("—" if name == "dense" else f"{expected['kl']:.5f}")
        assert cells[7] == f"{v['bench']['1']['decode_tokens_per_s']:,.1f}"
    assert "| decode tok/s b1 | prefill tok/s b1 |" in report_md
    assert "## Machine" in report_md and "## Configuration" in report_md and "## Stages" in report_md


def test_existing_run_refused_and_resume(tiny_run, corpus_dir, capsys):
    out, results = tiny_run
    code, _, err = run_cli(["pipeline", *tiny_args(corpus_dir, out)], capsys)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["pipeline", *tiny_args(corpus_dir, out), "--resume", "--set", "train.max_steps=31"], capsys)
    assert code == 2 and "train.max_steps" in err
    # A lost stage is redone; finished ones are kept.
    shutil.rmtree(out / "sample")
    code, _, err = run_cli(["pipeline", *tiny_args(corpus_dir, out), "--resume", "--json"], capsys)
    assert code == 0
    assert "dense: done in an earlier run" in err and "bench: done in an earlier run" in err
    assert "sample done in" in err
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["sample"] == results["sample"]
    assert resumed["variants"] == results["variants"]


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, corpus_dir, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["pipeline", *tiny_args(corpus_dir, tmp_path / "mine"), "--overwrite"], capsys)
    assert code == 2 and "not a pipeline run" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--set", "train.nope=1"], "unknown setting 'train.nope'"),
    (["--set", "nope=1"], "unknown setting 'nope'"),
    (["--set", "bench.batches=0"], "bench.batches"),
    (["--set", "train.preset=huge"], "unknown preset"),
    (["--set", "train.model.n_layer=two"], "bad value for train.model.n_layer"),
    (["--set", "train.model.n_layers=2"], "unknown setting 'train.model.n_layers'"),
])
def test_bad_settings_fail_before_any_work(tmp_path, capsys, args, message):
    code, _, err = run_cli(["pipeline", *args, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_key_in_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 5\nquantize:\n  int3: true\n")
    code, _, err = run_cli(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "unknown setting 'quantize.int3'" in err and len(err.strip().splitlines()) == 1


def test_default_yaml_is_the_default(capsys):
    """configs/default.yaml lists every section with the values the command uses when given no config."""
    assert pipeline.load_config(CONFIGS / "default.yaml", []) == pipeline.PipelineConfig()
    listed = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert set(listed) == set(pipeline.config_dict(pipeline.PipelineConfig()))
    code, out, _ = run_cli(["pipeline", "--print-config"], capsys)
    printed = yaml.safe_load(out)
    assert code == 0 and printed == {**pipeline.config_dict(pipeline.PipelineConfig()),
                                     "out": "runs/pipeline", "overwrite": False, "resume": False}


def test_help(capsys):
    code, out, _ = run_cli(["pipeline", "--help"], capsys)
    assert code == 0 and "--resume" in out and "--set" in out and "report.md" in out


def test_table_has_a_decode_column_per_batch(tiny_run):
    _, results = tiny_run
    results = json.loads(json.dumps(results))
    results["config"]["bench"]["batches"] = [8, 1]
    for v in results["variants"].values():
        v["bench"]["8"] = {**v["bench"]["1"], "batch": 8, "decode_tokens_per_s": 1234.5, "peak_memory_mb": 99999.0}
    lines = report.variant_table(results).splitlines()
    assert "| decode tok/s b1 | decode tok/s b8 | prefill tok/s b1 | TTFT ms b1 | peak MB |" in lines[0]
    assert all("| 99,999 |" in line and "| 1,234.5 |" in line for line in lines[2:])
    assert len(lines) == 2 + len(results["variants"])


def test_interrupted_training_stops_the_pipeline(tmp_path, corpus_dir, monkeypatch):
    """train returns normally after SIGINT (it saves and marks the metrics): the pipeline must not go on with a
    half-trained model, and keeps the finished stages for --resume."""
    def stopped_train(cfg, data, out, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        (out / "leangpt.json").write_text(json.dumps({"metrics": {"interrupted": "SIGINT"}}))
        return {"step": 1, "interrupted": "SIGINT"}

    monkeypatch.setattr(pipeline, "train", stopped_train)
    cfg = pipeline.load_config(TINY, [f"data.source={corpus_dir}"])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, out)
    assert (out / "data").is_dir() and not (out / "dense").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert list(json.loads((out / "pipeline.json").read_text())["stages"]) == ["data"]


def test_report_says_what_was_not_installed(tiny_run):
    _, results = tiny_run
    results = json.loads(json.dumps(results))
    results["llama_cpp"] = {"skipped": "llama-cpp-python is not installed"}
    for v in results["variants"].values():
        v["eval"]["lambada"] = {"skipped": "lm-eval is not installed"}
    text = report.markdown(results)
    assert "not timed: llama-cpp-python is not installed" in text
    assert "Not run: lm-eval is not installed" in text
    assert "| int8.gguf | q8_0 |" in text  # the files are still listed
    row = next(line for line in report.variant_table(results).splitlines() if line.startswith("| int8 |"))
    assert row.endswith("| — | — |")  # no lambada accuracy, no llama.cpp speed


def _bench_records(steps: dict[str, dict[str, dict]]) -> dict:
    return {"variants": {name: {"bench": records} for name, records in steps.items()}}


@pytest.mark.parametrize("steps, says", [
    ({"dense": {"1": {"decode_step": "c++"}}, "int8": {"1": {"decode_step": "c++"}}},
     "on leangpt's C++ decode step"),
    ({"dense": {"1": {"decode_step": "c++"}, "8": {"decode_step": "compiled"}},
      "int8": {"1": {"decode_step": "c++"}, "8": {"decode_step": "eager"}}},
     "on leangpt's C++ decode step for dense b1, int8 b1; on the compiled decode step (torch.compile; compile "
     "time not counted) for dense b8; on the eager decode step for int8 b8"),
    ({"dense": {"1": {"compile": True}}, "int8": {"1": {"compile": False}}},  # records from before decode_step
     "on the compiled decode step (torch.compile; compile time not counted) for dense b1; on the eager decode "
     "step for int8 b1"),
])
def test_report_says_which_decode_step_bench_timed(steps, says):
    assert report.decode_path(_bench_records(steps)) == says


def test_a_record_without_the_compile_key_counts_as_eager():
    assert report.decode_path({"variants": {"dense": {"bench": {"1": {}}}}}) == "on the eager decode step"
