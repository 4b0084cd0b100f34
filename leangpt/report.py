"""Render a pipeline run's results (report.json's content) as markdown, and plot quality against speed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

STAGE_COMMANDS = {"data": "`prepare`", "dense": "`train`", "int8": "`quantize`", "gptq-int4": "`quantize`",
                  "pruned": "`prune`", "distilled": "`distill`", "eval": "`eval`", "bench": "`bench`",
                  "export": "`export`", "llamacpp": "llama-cpp-python", "sample": "`generate`"}


def _f(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def describe(name: str, variant: dict[str, Any], config: dict[str, Any]) -> str:
    """One line on how the variant was made."""
    stage = variant.get("stage") or {}
    if name == "dense":
        t = config["train"]
        optimizer = (f"Muon (lr {t['muon_lr']:g}) on the block matrices and AdamW (lr {t['lr']:g}) on the rest"
                     if t.get("optimizer") == "muon" else f"AdamW (lr {t['lr']:g})")
        seen = (f", {stage['tokens']:,} tokens in {stage['train_time_s']:.0f} s"
                if "tokens" in stage and "train_time_s" in stage else "")
        return (f"`{t['preset']}` trained {stage.get('step', t['max_steps'])} steps × {t['batch_size']} sequences "
                f"with {optimizer}{seen} ({stage.get('compute_dtype', '?')} compute), stored fp32")
    if name in ("int8", "gptq-int4"):
        q = config["quantize"]
        how = ("int8 weights per output channel, round-to-nearest" if name == "int8" else
               f"int4 weights in groups of {q['group_size']} by GPTQ ({q['calib_samples']} calibration windows)")
        if str(stage.get("scheme", "")).endswith("-a8"):
            how += f", each product's inputs rounded to int8 per {'input row' if name == 'int8' else 'group'}"
        return f"{how}; {float_parts(stage.get('quantized_layers'), stage.get('tied_embeddings', True))}"
    if name == "pruned":
        p = config["prune"]
        heads, neurons = stage.get("heads", []), stage.get("neurons", [])
        return (f"structured: {sum(heads)}/{sum(stage.get('heads_before', heads))} heads and "
                f"{sum(neurons)}/{sum(stage.get('neurons_before', neurons))} MLP neurons kept, then "
                f"{p['recover_steps']} recovery steps ({p['recover_loss']} loss)")
    if name == "distilled":
        d = config["distill"]
        layers = d["student_layers"] or "every other block"
        return f"student of the dense model's blocks ({layers}), {d['max_steps']} distillation steps"
    return ""


def float_parts(layers: list[str] | None, tied: bool) -> str:
    """What a quantized checkpoint keeps in full precision, from the layers its metadata lists as quantized."""
    if layers is None:
        return "embedding and head as stored in the checkpoint"
    embedding, head = "tok_emb" in layers, "lm_head" in layers or (tied and "tok_emb" in layers)
    if embedding and head:
        return "embedding and head quantized too"
    if embedding or head:
        return f"{'embedding' if embedding else 'head'} quantized, {'head' if embedding else 'embedding'} fp32"
    return "embedding and head fp32"


def variant_table(results: dict[str, Any]) -> str:
    """One markdown table: every variant side by side."""
    batches = sorted(int(b) for b in results["config"]["bench"]["batches"])
    first = str(batches[0])
    head = (["variant", "params", "size MB", "bits/byte", "perplexity", "KL vs dense", "top-1 = dense"]
            + [f"decode tok/s b{b}" for b in batches]
            + [f"prefill tok/s b{first}", f"TTFT ms b{first}", "peak MB", "lambada acc",
               f"llama.cpp decode tok/s b{first}"])
    own_files = same_weight_files(results)
    rows = []
    for name, v in results["variants"].items():
        e, bench = v["eval"], v["bench"]
        b0 = bench.get(first, {})
        rows.append([
            name, _f(b0.get("params") and b0["params"] / 1e6, ".2f") + " M", _f(b0.get("size_mb"), ".2f"),
            _f(e["bits_per_byte"], ".4f"), _f(e["perplexity"], ".2f"), _f(e.get("kl"), ".5f"),
            _f(e.get("top1_agreement") and 100 * e["top1_agreement"], ".1f") + (" %" if "top1_agreement" in e else ""),
            *(_f(bench.get(str(b), {}).get("decode_tokens_per_s"), ",.1f") for b in batches),
            _f(b0.get("prefill_tokens_per_s"), ",.0f"),
            _f(b0.get("time_to_first_token_s") and 1000 * b0["time_to_first_token_s"], ".1f"),
            _f(max((r["peak_memory_mb"] for r in bench.values()), default=None), ",.0f"),
            _percent(e.get("lambada", {}).get("acc")),
            _f(llama_cpp_speed(results, own_files.get(name), first), ",.1f"),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def same_weight_files(results: dict[str, Any]) -> dict[str, str]:
    """{variant: its GGUF file exported as stored}: the same weights in llama.cpp."""
    return {r["variant"]: name for name, r in (results.get("gguf") or {}).items() if r.get("same_weights")}


def llama_cpp_speed(results: dict[str, Any], file_name: str | None, batch: str) -> float | None:
    files = (results.get("llama_cpp") or {}).get("files", {})
    return files.get(file_name, {}).get(batch, {}).get("decode_tokens_per_s")


def lambada_section(results: dict[str, Any]) -> list[str]:
    """shakespeare-lambada per variant: accuracy and word perplexity with stderrs, and the paired differences
    from the dense model over the same passages."""
    scores = {name: v["eval"].get("lambada") for name, v in results["variants"].items()}
    if not any(scores.values()):
        return []
    out = ["## shakespeare-lambada", ""]
    skipped = next((s["skipped"] for s in scores.values() if s and "skipped" in s), None)
    if skipped:
        return out + [f"Not run: {skipped} (`pip install 'leangpt[eval]'`).", ""]
    passages = next(s["passages"] for s in scores.values() if s)
    out += [f"The last word of {passages} passages of the val split, predicted from the passage (`leangpt eval "
            f"--tasks shakespeare-lambada`): accuracy of the greedy word and perplexity of the word, ± their "
            f"stderr; beside the dense model, the paired differences over the same passages (± stderr; a positive "
            f"log-likelihood difference: the variant gives the right word more probability), which separate "
            f"variants whose own stderrs overlap.", "",
            "| variant | accuracy | word perplexity | Δ accuracy vs dense | Δ word log-likelihood vs dense (nats) |",
            "|---|---|---|---|---|"]
    for name, s in scores.items():
        acc, ll = s.get("acc_vs_dense"), s.get("loglik_vs_dense")
        out.append(f"| {name} | {_percent(s['acc'])} ± {_percent(s['acc_stderr'])} | {_f(s['perplexity'], ',.1f')} ± "
                   f"{_f(s['perplexity_stderr'], ',.1f')} | "
                   + ("—" if acc is None else f"{100 * acc['mean']:+.1f} ± {100 * acc['stderr']:.1f} pts") + " | "
                   + ("—" if ll is None else f"{ll['mean']:+.4f} ± {ll['stderr']:.4f}") + " |")
    return out + [""]


def llama_cpp_section(results: dict[str, Any]) -> list[str]:
    """Every GGUF file of the run in llama.cpp, beside leangpt's speed on the same weights where it has them."""
    files, peer = results.get("gguf"), results.get("llama_cpp")
    if not files:
        return []
    batches = [str(b) for b in sorted(int(b) for b in results["config"]["bench"]["batches"])]
    if peer and "files" in peer:
        timing = (f"timed in {peer['runtime']} on {peer['threads']} threads as `leangpt bench` times leangpt "
                  f"(greedy, the same prompt and new tokens, median of the same repeats)")
    else:
        timing = ("not timed: " + peer["skipped"] if peer else "not timed (export.llama_cpp: false)")
    out = ["## llama.cpp on the same weights", "",
           f"`leangpt export --format gguf` of each variant into RUN/export, {timing}. A variant's own file holds its "
           f"weights unchanged (int8 as q8_0, int4 as q4_1, only the scales rounded to fp16); the dense-TYPE "
           f"files are the dense model requantized by the export into llama.cpp's own formats, with no leangpt "
           f"counterpart of the same weights.", "",
           "| GGUF file | type | size MB | " + " | ".join(f"llama.cpp decode tok/s b{b} | leangpt ÷ llama.cpp b{b}"
                                                      for b in batches) + " |",
           "|---|---|---|" + "---|---|" * len(batches)]
    for name, r in files.items():
        if "refused" in r:
            out.append(f"| {name} | not exported: {r['refused']} |" + " |" * (1 + 2 * len(batches)))
            continue
        bench = results["variants"][r["variant"]]["bench"] if r["same_weights"] else {}
        cells = []
        for b in batches:
            theirs, ours = llama_cpp_speed(results, name, b), bench.get(b, {}).get("decode_tokens_per_s")
            cells += [_f(theirs, ",.1f"), f"{ours / theirs:.2f}×" if ours and theirs else "—"]
        out.append(f"| {name} | {r['type']} | {r['size_mb']:.2f} | " + " | ".join(cells) + " |")
    return out + [""]


def busy_note(results: dict[str, Any]) -> str:
    """Speeds are only comparable on a quiet machine: say when it was not."""
    load = results["load_average_start"][0]
    cores = results["machine"]["cores"] or 1
    if load > cores / 2:
        return (f"**The machine was likely shared**: load average {load:.2f} on {cores} cores when the run started, "
                f"so other processes may have taken CPU time, and the speeds below may be lower and noisier than on a "
                f"quiet machine (the ratios between variants, measured back to back, hold better).")
    return f"Quiet machine: load average {load:.2f} on {cores} cores when the run started."


STEPS = {"c++": "leangpt's C++ decode step", "eager": "the eager decode step",
         "compiled": "the compiled decode step (torch.compile; compile time not counted)"}


def decode_path(results: dict[str, Any]) -> str:
    """Which decode step bench timed, as each record says (older records say only whether they compiled)."""
    runs: dict[str, list[str]] = {}
    for name, v in results["variants"].items():
        for batch, r in v["bench"].items():
            step = r.get("decode_step") or ("compiled" if r.get("compile") else "eager")
            runs.setdefault(step, []).append(f"{name} b{batch}")
    if len(runs) == 1:
        return f"on {STEPS[next(iter(runs))]}"
    return "; ".join(f"on {STEPS[step]} for {', '.join(names)}" for step, names in runs.items())


def markdown(results: dict[str, Any]) -> str:
    m, config = results["machine"], results["config"]
    bench = config["bench"]
    out = [
        "# leangpt pipeline report", "",
        f"`{results['command']}` — started {results['started']}, {results['wall_s'] / 60:.1f} minutes"
        + (f" (resumed: the stages, this run's and the earlier run's, took {results['stages_total_s'] / 60:.1f} "
           f"minutes)" if results.get("resumed") else "") + ".", "",
        busy_note(results), "",
        "## Variants", "",
        variant_table(results), "",
        f"Quality: `leangpt eval` on {_tokens(config['eval']['max_tokens'])} of the val split; KL(dense ‖ variant) "
        f"in nats per token and top-1 agreement with the dense model (`eval --reference`). Speed: `leangpt bench`, "
        f"greedy decoding of {bench['new_tokens']} new tokens after a {bench['prompt_tokens']}-token random prompt, "
        f"median of {bench['repeats']} runs after a warm-up, each model in a fresh process, {decode_path(results)}; "
        f"TTFT = prefill of the prompt; peak MB = peak resident memory of that process (the largest batch). "
        f"Size: `model*.safetensors` on disk.", "",
    ]
    out += [f"- **{name}**: {describe(name, v, config)}" for name, v in results["variants"].items()]
    if results.get("plot"):
        out += ["", f"![bits per byte against decode speed]({results['plot']})"]
    out += [""] + lambada_section(results) + llama_cpp_section(results)
    sample = results["sample"]
    out += ["## Sample from the dense model", "",
            f"Prompt `{sample['prompt']}`, temperature {config['sample']['temperature']}, "
            f"seed {config['sample']['seed']}, {sample['tokens']} tokens:", "",
            "```text", sample["prompt"] + sample["text"], "```", ""]
    out += ["## Stages", "", "| stage (RUN/…) | by | seconds | load average (1 min) after |", "|---|---|---|---|"]
    order = [name for name in STAGE_COMMANDS if name in results["stages"]]
    out += [f"| {name} | {STAGE_COMMANDS[name]} | {results['stages'][name]['seconds']:.1f} | "
            f"{results['stages'][name]['load_average'][0]:.2f} |" for name in order]
    out += [f"| **total** | | {results['stages_total_s']:.1f} | |", ""]
    out += ["## Machine", "",
            f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']} ({m['torch_threads']} threads), "
            f"Python {m['python']}, {m['platform']}" + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + ". "
            f"Load average (1, 5, 15 min) at the start {_loads(results['load_average_start'])}, "
            f"at the end {_loads(results['load_average_end'])}.", ""]
    out += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(out)


def _tokens(n: int | None) -> str:
    return "all tokens" if n is None else f"the first {n:,} tokens"


def _loads(loads: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in loads)


def plot(results: dict[str, Any], path: Path) -> bool:
    """report.png: bits per byte (lower is better) against batch-1 decode tokens/s, one point per variant."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    first = str(min(int(b) for b in results["config"]["bench"]["batches"]))
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    for name, v in results["variants"].items():
        speed = v["bench"].get(first, {}).get("decode_tokens_per_s")
        if speed is None:
            continue
        ax.scatter(speed, v["eval"]["bits_per_byte"])
        ax.annotate(name, (speed, v["eval"]["bits_per_byte"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel(f"decode tokens/s (batch {first})")
    ax.set_ylabel("val bits per byte (lower is better)")
    ax.set_title("quality against speed per variant")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True
