"""`leangpt pipeline`: the main job. prepare → train → variants (int8, GPTQ int4, structured prune, distilled
student) → eval (bits per byte, KL, shakespeare-lambada) and bench of every variant → GGUF exports timed in
llama.cpp on the same weights → a sample → RUN/report.md and RUN/report.json.

Every stage is the real command run in this process (its library function or its main(argv) with --json),
writing into a temporary directory that is renamed to RUN/<stage> when it is complete; RUN/pipeline.json
records each finished stage, so `--resume` skips those and runs the rest.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leangpt import cli, distributed, machine, report
from leangpt.bench import BenchSettings, bench
from leangpt.checkpoint import read_meta
from leangpt.config import ModelConfig
from leangpt.data import lambada
from leangpt.data.prepare import PrepareSettings, prepare
from leangpt.distill import DistillSettings, distill
from leangpt.errors import UserError
from leangpt.evaluate import EvalSettings, evaluate, paired_difference
from leangpt.export import ExportSettings, export
from leangpt.export.runtimes import gguf_speed, llama_cpp_version
from leangpt.fsutil import atomic_dir, atomic_write_text, check_output_dir, read_json
from leangpt.generate import GenerateSettings, generate
from leangpt.prune import PruneSettings, prune, recovery_defaults
from leangpt.quantize import QuantizeSettings, quantize
from leangpt.train import TrainConfig, train

STATE_FILE = "pipeline.json"


# ---------------------------------------------------------------- settings: one small config per stage

@dataclass
class DataConfig:
    source: list[str] = field(default_factory=lambda: ["shakespeare"])  # as `leangpt prepare --source`
    vocab_size: int = 8192
    val_fraction: float = 0.1
    seed: int = 0
    filters: bool = True  # the Gopher quality filters, as `leangpt prepare` applies them by default


def train_defaults() -> TrainConfig:
    """`leangpt train`'s settings; the pipeline's defaults fit the whole run in about 11 minutes on 2 cores."""
    return TrainConfig(preset="cpu-5min", max_steps=250, batch_size=16, eval_every=0, eval_tokens=16384,
                       log_every=25)


@dataclass
class QuantizeConfig:
    int8: bool = True  # int8 per output channel, round-to-nearest
    gptq_int4: bool = True  # int4 by GPTQ
    group_size: int = 64
    calib_samples: int = 64  # GPTQ calibration windows from the train split
    calib_seq_len: int | None = None  # None: min(256, the model's context)
    # each product's inputs: int8 (int4 per weight group, int8 per input row: integer products) or float
    activations: str = "int8"


@dataclass
class PruneConfig:
    enabled: bool = True  # structured pruning: a smaller dense model
    heads: float = 0.25  # fraction of attention heads removed (1 of 4 in cpu-5min)
    neurons: float = 0.5  # fraction of MLP neurons removed
    calib_samples: int = 32
    recover_steps: int = 60  # fine-tuning steps after pruning; 0 skips recovery
    recover_loss: str = "lm"  # lm | distill (from the unpruned model)
    lr: float = 3e-4


@dataclass
class DistillStageConfig:
    enabled: bool = False  # a student of every other teacher block, trained on the teacher's soft targets
    student_layers: str | None = None  # teacher blocks copied into the student, e.g. "0,3"; None: every other
    max_steps: int = 100
    lr: float = 1e-3


@dataclass
class EvalConfig:
    max_tokens: int | None = 65536  # val tokens scored per variant; None: the whole split
    batch_size: int = 8
    lambada_passages: int = lambada.PASSAGES  # shakespeare-lambada passages per variant; 0 skips the task


@dataclass
class ExportConfig:
    gguf: bool = True  # GGUF files for llama.cpp: every variant it runs, as stored, and the dense model requantized
    dense_types: list[str] = field(default_factory=lambda: ["q8_0", "q4_0"])  # the dense model's requantized files
    llama_cpp: bool = True  # llama.cpp's speed on every file, as bench times leangpt (needs llama-cpp-python)


@dataclass
class BenchConfig:
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 32
    new_tokens: int = 128
    repeats: int = 3
    threads: int | None = None  # None: torch's choice, one per core


@dataclass
class SampleConfig:
    prompt: str = "ROMEO:"
    max_new_tokens: int = 80
    temperature: float = 0.8
    seed: int = 1


@dataclass
class ReportConfig:
    plot: bool = True  # report.png: bits per byte against decode speed


@dataclass
class PipelineConfig:
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=train_defaults)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        """Everything that can be checked before the first stage, so a typo does not cost a training run."""
        self.train.validate()
        ModelConfig.from_preset(self.train.preset, **self.train.model)
        checks = [
            (bool(self.data.source), "data.source must name at least one source"),
            (0 < self.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
            (self.quantize.calib_samples >= 1, "quantize.calib_samples must be >= 1"),
            (self.quantize.activations in ("int8", "float"), "quantize.activations must be int8 or float"),
            (0 <= self.prune.heads < 1 and 0 <= self.prune.neurons < 1, "prune.heads and prune.neurons must be in [0, 1)"),
            (not self.prune.enabled or self.prune.heads > 0 or self.prune.neurons > 0,
             "prune.enabled needs prune.heads or prune.neurons > 0"),
            (self.prune.recover_steps >= 0 and self.prune.calib_samples >= 1,
             "prune.recover_steps must be >= 0 and prune.calib_samples >= 1"),
            (self.prune.recover_loss in ("lm", "distill"), "prune.recover_loss must be lm or distill"),
            (self.distill.max_steps >= 1, "distill.max_steps must be >= 1"),
            (self.eval.max_tokens is None or self.eval.max_tokens >= 2, "eval.max_tokens must be >= 2"),
            (self.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
            (self.eval.lambada_passages >= 0, "eval.lambada_passages must be >= 0"),
            (set(self.export.dense_types) <= {"f16", "q8_0", "q4_0", "q4_1"},
             "export.dense_types must be among f16, q8_0, q4_0, q4_1 (the dense model's f32 file is always written)"),
            (bool(self.bench.batches) and min(self.bench.batches) >= 1, "bench.batches must be >= 1"),
            (min(self.bench.prompt_tokens, self.bench.new_tokens, self.bench.repeats) >= 1,
             "bench.prompt_tokens, bench.new_tokens and bench.repeats must be >= 1"),
            (self.sample.max_new_tokens >= 1, "sample.max_new_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad setting: {message}")

    def variants(self) -> list[str]:
        """Checkpoint stages, the dense model first."""
        wanted = [("int8", self.quantize.int8), ("gptq-int4", self.quantize.gptq_int4),
                  ("pruned", self.prune.enabled), ("distilled", self.distill.enabled)]
        return ["dense"] + [name for name, on in wanted if on]


def load_config(config_file: Path | None, overrides: list[str]) -> PipelineConfig:
    cfg = cli.apply_overrides(PipelineConfig(), config_file, overrides)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- the run directory

class Run:
    """The run directory: stage outputs, their records in pipeline.json, progress on stderr."""

    def __init__(self, out: Path, cfg: PipelineConfig, resume: bool) -> None:
        self.out, self.cfg = out, cfg
        self.state: dict[str, Any] = {"config": config_dict(cfg), "stages": {}}
        if resume:
            saved = read_json(out / STATE_FILE)
            if saved.get("config") != self.state["config"]:
                key = _first_difference(saved.get("config", {}), self.state["config"])
                raise UserError(f"--resume: the settings differ from the saved run's ({key}); "
                                f"use --overwrite to start again")
            self.state["stages"] = {k: v for k, v in saved.get("stages", {}).items() if (out / k).is_dir()}
        self.save()

    def save(self) -> None:
        atomic_write_text(self.out / STATE_FILE, json.dumps(self.state, indent=2))

    def path(self, stage: str) -> Path:
        return self.out / stage

    def stage(self, name: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run fn(tmp_dir) unless this stage is already complete; tmp_dir becomes RUN/name when fn returns."""
        if name in self.state["stages"]:
            cli.log(f"pipeline: {name}: done in an earlier run ({self.state['stages'][name]['seconds']:.1f}s), skipped")
            return self.state["stages"][name]["result"]
        cli.log(f"pipeline: {name} ...")
        t0 = time.perf_counter()
        with atomic_dir(self.path(name)) as tmp:
            result = fn(tmp)
            if read_meta(tmp).get("metrics", {}).get("interrupted"):  # training stopped by SIGINT / SIGTERM
                cli.log(f"pipeline: {name} interrupted; the stages done so far are kept (--resume)")
                raise KeyboardInterrupt
        seconds = time.perf_counter() - t0
        self.state["stages"][name] = {"seconds": seconds, "result": result, "load_average": os.getloadavg()}
        self.save()
        cli.log(f"pipeline: {name} done in {seconds:.1f}s")
        return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    fa, fb = _flat(a), _flat(b)
    return next((k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)), "?")


def config_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return cli.to_dict(cfg)


# ---------------------------------------------------------------- the stages: each calls its command's library function

def stage_data(cfg: DataConfig) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        settings = PrepareSettings(source=list(cfg.source), out=tmp, vocab_size=cfg.vocab_size,
                                   val_fraction=cfg.val_fraction, seed=cfg.seed, overwrite=True,
                                   filters_enabled=cfg.filters, workers=os.cpu_count() or 1,
                                   progress=sys.stderr.isatty())
        manifest = prepare(settings)
        return {"documents_read": manifest["documents_read"], "documents_kept": manifest["documents_kept"],
                "bytes_read": manifest["bytes_read"], "vocab_size": manifest["vocab_size"],
                "train_tokens": manifest["train"]["tokens"], "val_tokens": manifest["val"]["tokens"]}
    return run


def stage_train(cfg: TrainConfig, device: str, data: Path) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        try:
            final = train(dataclasses.replace(cfg, device=device), data, tmp, overwrite=True)
        finally:
            distributed.shutdown()
        return {k: final[k] for k in ("step", "tokens", "train_time_s", "tokens_per_s", "mfu", "val_loss",
                                      "val_bits_per_byte", "params", "compute_dtype") if k in final}
    return run


def stage_quantize(method: str, cfg: QuantizeConfig, device: str, dense: Path, data: Path) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        settings = QuantizeSettings(model=dense, out=tmp, method=method, group_size=cfg.group_size, device=device,
                                    activations=cfg.activations, overwrite=True, progress=False)
        if method.startswith("gptq"):
            settings.calib_data, settings.calib_samples, settings.calib_seq_len = data, cfg.calib_samples, cfg.calib_seq_len
        result = quantize(settings)
        return {k: result[k] for k in ("method", "scheme", "bits_per_weight", "size_ratio", "seconds",
                                       "quantized_layers", "tied_embeddings")}
    return run


def stage_prune(cfg: PruneConfig, tc: TrainConfig, device: str, dense: Path, data: Path) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        recovery = dataclasses.replace(recovery_defaults(), lr=cfg.lr, batch_size=tc.batch_size, block_size=tc.block_size,
                                       precision=tc.precision, eval_tokens=tc.eval_tokens, log_every=tc.log_every)
        settings = PruneSettings(model=dense, out=tmp, method="structured", heads=cfg.heads, neurons=cfg.neurons,
                                 calib_data=data, calib_samples=cfg.calib_samples, recover_steps=cfg.recover_steps,
                                 recover_loss=cfg.recover_loss, device=device, overwrite=True, recovery=recovery)
        try:
            result = prune(settings)
        finally:
            distributed.shutdown()
        keep = ("heads", "neurons", "heads_before", "neurons_before", "params_before", "params", "prune_seconds")
        out = {k: result[k] for k in keep if k in result}
        if "recovery" in result:
            out["recovery"] = {k: v for k, v in result["recovery"].items() if k != "train_config"}
        return out
    return run


def stage_distill(cfg: DistillStageConfig, tc: TrainConfig, device: str, dense: Path, data: Path) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        settings = DistillSettings(teacher=dense, data=data, out=tmp, overwrite=True, student_layers=cfg.student_layers,
                                   max_steps=cfg.max_steps, lr=cfg.lr, batch_size=tc.batch_size,
                                   block_size=tc.block_size, precision=tc.precision, eval_every=0,
                                   eval_tokens=tc.eval_tokens, log_every=tc.log_every, device=device, seed=tc.seed)
        try:
            result = distill(settings)
        finally:
            distributed.shutdown()
        return {k: result[k] for k in ("step", "train_time_s", "val_loss", "val_bits_per_byte", "params") if k in result}
    return run


def eval_settings(cfg: EvalConfig, device: str, model: Path, data: Path, reference: Path | None) -> EvalSettings:
    """The `leangpt eval` settings the pipeline uses for one variant (tests rerun exactly these)."""
    return EvalSettings(model=model, data=data, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
                        reference=reference, device=device, progress=False)


def lambada_settings(cfg: EvalConfig, device: str, model: Path, data: Path) -> EvalSettings:
    """The `leangpt eval --tasks shakespeare-lambada` settings for one variant, per-passage values kept."""
    return EvalSettings(model=model, data=data, tasks=[lambada.TASK], lambada_passages=cfg.lambada_passages,
                        batch_size=cfg.batch_size, log_samples=True, device=device, progress=False)


def lambada_scores(result: dict[str, Any], dense: dict[str, list[float]] | None) -> dict[str, Any]:
    """Accuracy and word perplexity with their stderrs; beside the dense model, the paired differences of
    accuracy and of the target word's log-likelihood over the same passages, which tell variants apart far
    better than the stderrs of each."""
    metrics, samples = result["tasks"][lambada.TASK], result["samples"][lambada.TASK]
    out = {k: metrics[k] for k in ("acc", "acc_stderr", "perplexity", "perplexity_stderr")}
    out["passages"] = len(samples["acc"])
    if dense is not None:
        out["acc_vs_dense"] = paired_difference(samples["acc"], dense["acc"])
        out["loglik_vs_dense"] = paired_difference(samples["perplexity"], dense["perplexity"])  # nats per word
    return out


def stage_eval(cfg: EvalConfig, device: str, models: dict[str, Path], data: Path) -> Callable[[Path], dict[str, Any]]:
    """`leangpt eval` of every variant; the others also take the dense model as reference (KL, top-1 agreement);
    then shakespeare-lambada for each (where lm-eval is installed)."""
    def run(tmp: Path) -> dict[str, Any]:
        results = {}
        for name, path in models.items():
            t0 = time.perf_counter()
            results[name] = evaluate(eval_settings(cfg, device, path, data, None if name == "dense" else models["dense"]))
            cli.log(f"pipeline: eval {name}: bits/byte {results[name]['bits_per_byte']:.4f} "
                    f"({time.perf_counter() - t0:.1f}s)")
        if cfg.lambada_passages:
            lambada_skipped = None if importlib.util.find_spec("lm_eval") else "lm-eval is not installed"
            dense_samples = None
            for name, path in models.items():
                if lambada_skipped:
                    results[name]["lambada"] = {"skipped": lambada_skipped}
                    continue
                t0 = time.perf_counter()
                task = evaluate(lambada_settings(cfg, device, path, data))
                results[name]["lambada"] = lambada_scores(task, dense_samples)
                dense_samples = dense_samples or task["samples"][lambada.TASK]
                cli.log(f"pipeline: {lambada.TASK} {name}: accuracy {results[name]['lambada']['acc']:.3f} "
                        f"({time.perf_counter() - t0:.1f}s)")
        for name, result in results.items():
            (tmp / f"{name}.json").write_text(json.dumps(result, indent=2))
        return results
    return run


def stage_bench(cfg: BenchConfig, device: str, models: dict[str, Path]) -> Callable[[Path], dict[str, Any]]:
    """`leangpt bench` of every variant (each record in its own fresh process, so its peak memory is its own)."""
    def run(tmp: Path) -> dict[str, Any]:
        records = bench(BenchSettings(models=list(models.values()), batches=list(cfg.batches),
                                      prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens, repeats=cfg.repeats,
                                      threads=cfg.threads, device=device))
        (tmp / "results.json").write_text(json.dumps(records, indent=2))
        by_path = {str(p): name for name, p in models.items()}
        out: dict[str, Any] = {name: {} for name in models}
        for r in records:
            out[by_path[r["model"]]][str(r["batch"])] = r
        return out
    return run


def gguf_files(cfg: ExportConfig, models: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """The GGUF files of the export stage, {file name: (variant, type)}: each variant as stored (a float one as
    f32, a quantized one with its own integers: the same weights), then the dense model requantized."""
    files = {f"{name}.gguf": (name, "auto") for name in models}
    files.update({f"dense-{t}.gguf": ("dense", t) for t in cfg.dense_types})
    return files


def stage_export(cfg: ExportConfig, models: dict[str, Path]) -> Callable[[Path], dict[str, Any]]:
    """`leangpt export --format gguf` of every variant llama.cpp can run; the others record why not."""
    def run(tmp: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for file_name, (name, type_name) in gguf_files(cfg, models).items():
            try:
                result = export(ExportSettings(model=models[name], format="gguf", out=tmp / file_name,
                                               type=type_name, progress=False))
            except UserError as e:  # an architecture llama.cpp cannot run, e.g. per-layer pruned widths
                out[file_name] = {"variant": name, "refused": str(e)}
                continue
            out[file_name] = {"variant": name, "same_weights": type_name == "auto", "type": result["type"],
                              "size_mb": result["size_bytes"] / 1e6, "kept_integers": result["kept_integers"],
                              "requantized": len(result["requantized"])}
        return out
    return run


def stage_llama_cpp(cfg: BenchConfig, files: dict[str, Any], export_dir: Path) -> Callable[[Path], dict[str, Any]]:
    """llama.cpp's prefill and decode speed on every GGUF file at bench's batches, timed as bench times leangpt
    (greedy, random prompts, one warm-up, median of the repeats), on as many threads as leangpt's bench."""
    def run(tmp: Path) -> dict[str, Any]:
        version = llama_cpp_version()
        if version is None:
            return {"skipped": 'llama-cpp-python is not installed (pip install -e ".[llamacpp]")'}
        threads = cfg.threads or torch.get_num_threads()
        out: dict[str, Any] = {"runtime": f"llama.cpp (llama-cpp-python {version})", "threads": threads, "files": {}}
        for file_name, record in files.items():
            if "refused" in record:
                continue
            speeds = {str(b): gguf_speed(export_dir / file_name, b, cfg.prompt_tokens, cfg.new_tokens, threads,
                                         cfg.repeats) for b in cfg.batches}
            out["files"][file_name] = speeds
            first = speeds[str(cfg.batches[0])]
            cli.log(f"pipeline: llama.cpp {file_name}: decode {first['decode_tokens_per_s']} tok/s at batch "
                    f"{cfg.batches[0]}")
        (tmp / "results.json").write_text(json.dumps(out, indent=2))
        return out
    return run


def stage_sample(cfg: SampleConfig, device: str, dense: Path) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        result = generate(GenerateSettings(model=dense, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, seed=cfg.seed, device=device))
        (tmp / "sample.json").write_text(json.dumps(result, indent=2))
        return result
    return run


# ---------------------------------------------------------------- the whole chain

def run_pipeline(cfg: PipelineConfig, out: Path, overwrite: bool = False, resume: bool = False,
                 command: str = "leangpt pipeline") -> dict[str, Any]:
    """Run every stage into the run directory `out` and write its report; returns report.json's content."""
    cfg.validate()
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume:
        if not (out / STATE_FILE).is_file():
            raise UserError(f"--resume: {out} holds no pipeline run ({STATE_FILE} not found)")
    else:
        _fresh_run_dir(out, overwrite)
    started, load_start = time.time(), os.getloadavg()
    t0 = time.perf_counter()
    run = Run(out, cfg, resume)
    data, dense = run.path("data"), run.path("dense")
    run.stage("data", stage_data(cfg.data))
    run.stage("dense", stage_train(cfg.train, cfg.device, data))
    if cfg.quantize.int8:
        run.stage("int8", stage_quantize("int8", cfg.quantize, cfg.device, dense, data))
    if cfg.quantize.gptq_int4:
        run.stage("gptq-int4", stage_quantize("gptq-int4", cfg.quantize, cfg.device, dense, data))
    if cfg.prune.enabled:
        run.stage("pruned", stage_prune(cfg.prune, cfg.train, cfg.device, dense, data))
    if cfg.distill.enabled:
        run.stage("distilled", stage_distill(cfg.distill, cfg.train, cfg.device, dense, data))
    models = {name: run.path(name) for name in cfg.variants()}
    run.stage("eval", stage_eval(cfg.eval, cfg.device, models, data))
    run.stage("bench", stage_bench(cfg.bench, cfg.device, models))
    if cfg.export.gguf:
        files = run.stage("export", stage_export(cfg.export, models))
        if cfg.export.llama_cpp:
            run.stage("llamacpp", stage_llama_cpp(cfg.bench, files, run.path("export")))
    run.stage("sample", stage_sample(cfg.sample, cfg.device, dense))
    results = {
        "command": command, "out": str(out), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": time.perf_counter() - t0, "resumed": resume,
        "stages_total_s": sum(v["seconds"] for v in run.state["stages"].values()),
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "machine": machine.describe(), "config": run.state["config"],
        "stages": {k: {"seconds": v["seconds"], "load_average": v["load_average"]} for k, v in run.state["stages"].items()},
        "variants": {name: {"checkpoint": str(models[name]), "stage": run.state["stages"].get(name, {}).get("result"),
                            "eval": run.state["stages"]["eval"]["result"][name],
                            "bench": run.state["stages"]["bench"]["result"][name]} for name in models},
        "sample": run.state["stages"]["sample"]["result"],
        "gguf": run.state["stages"].get("export", {}).get("result"),
        "llama_cpp": run.state["stages"].get("llamacpp", {}).get("result"),
    }
    write_report(out, results, cfg.report.plot)
    return results


def _fresh_run_dir(out: Path, overwrite: bool) -> None:
    """A new run needs a new directory; --overwrite replaces only a previous run, never an unrelated folder."""
    check_output_dir(out, overwrite)
    if out.exists():
        if any(out.iterdir()) and not (out / STATE_FILE).is_file():
            raise UserError(f"{out} is not a pipeline run directory ({STATE_FILE} not found); "
                            f"refusing to replace it")
        with atomic_dir(out):
            pass  # an empty directory takes the old run's place
    out.mkdir(parents=True, exist_ok=True)


def write_report(out: Path, results: dict[str, Any], plot: bool) -> None:
    if plot and report.plot(results, out / "report.png"):
        results["plot"] = "report.png"
    atomic_write_text(out / "report.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", report.markdown(results))


# ---------------------------------------------------------------- the command

@dataclass
class PipelineCommand(PipelineConfig):
    """The pipeline's settings plus where the run goes: what `leangpt pipeline` parses."""

    out: Path = cli.setting(Path("runs/pipeline"), "run directory to write")
    overwrite: bool = cli.setting(False, "replace an existing run directory (never a folder that is not a run)")
    resume: bool = cli.setting(False, "continue the run in --out: stages finished there are kept, the rest run "
                                      "(the settings must be the saved run's)")

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        super().validate()

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PipelineConfig)})


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(PipelineCommand, "pipeline", "The main job on one config: prepare the data, train a "
                            "model, make its smaller variants (int8, GPTQ int4, structured pruning, optionally a "
                            "distilled student), evaluate and benchmark each, and write RUN/report.md and "
                            "RUN/report.json with every variant side by side. Settings: configs/default.yaml lists "
                            "them (the defaults); nested keys with dots, e.g. --set train.max_steps=100 --set "
                            "distill.enabled=true.")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    command = shlex.join(["leangpt", "pipeline", *(sys.argv[2:] if argv is None else argv)])
    results = run_pipeline(settings.pipeline_config(), settings.out, settings.overwrite, settings.resume, command)
    cli.log(f"pipeline: wrote {settings.out / 'report.md'} in {results['wall_s']:.0f}s")
    if output.json:
        cli.print_json(results)
    else:
        print(report.variant_table(results))
    return 0
