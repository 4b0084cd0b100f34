"""lm-evaluation-harness in-process: the LM subclass against direct computations, tasks made here with answers
known by construction, and shakespeare-lambada built from a dataset."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from leangpt.checkpoint import load_checkpoint
from leangpt.data import lambada
from leangpt.data.shards import Dataset
from leangpt.evaluate import EvalSettings, evaluate
from tests.conftest import WORDS, run_cli

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from leangpt.lm_eval_model import LeanGPTLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def write_choice_task(directory, n_docs: int = 12) -> str:
    """A multiple-choice task whose right answer is the corpus's own kind of text (words the model was trained
    on, one of them repeated from the context) and the wrong one characters it never saw; the right answer's
    position alternates, so a position bias cannot score."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n_docs):
        words = [str(w) for w in rng.choice(WORDS, 6)]
        context = " ".join(words).capitalize()
        right, wrong = f" {words[2]} {words[4]}.", " #@% &*^ ~|"
        docs.append({"context": context, "choices": [right, wrong] if i % 2 == 0 else [wrong, right],
                     "label": i % 2})
    data = directory / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    config = {"task": "tiny-choice", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
              "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
              "metric_list": metrics, "metadata": {"version": 1}}
    (directory / "tiny_choice.yaml").write_text(yaml.safe_dump(config))
    return "tiny-choice"


def test_multiple_choice_task_scores_as_constructed(tiny_checkpoint, tmp_path):
    task = write_choice_task(tmp_path)
    result = evaluate(EvalSettings(model=tiny_checkpoint, tasks=[task], include_path=[tmp_path], progress=False))
    metrics = result["tasks"][task]
    assert metrics["acc"] == 1 and metrics["acc_norm"] == 1 and metrics["samples"] == 12
    assert metrics["acc_stderr"] == 0 and metrics["num_fewshot"] == 0
    assert result["model"] == str(tiny_checkpoint) and result["lm_eval_version"]


def test_a_quantized_variant_scores_the_task_too(tiny_checkpoint, tmp_path):
    from leangpt.quantize import QuantizeSettings, quantize

    quantize(QuantizeSettings(model=tiny_checkpoint, out=tmp_path / "int8", method="int8", progress=False))
    task = write_choice_task(tmp_path)
    result = evaluate(EvalSettings(model=tmp_path / "int8", tasks=[task], include_path=[tmp_path], progress=False))
    assert result["tasks"][task]["acc"] == 1

    dense, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    int8, _, _ = load_checkpoint(tmp_path / "int8")
    requests = instances("loglikelihood", [("The king", " rides with the queen."), ("Gold", " #@% &*^")])
    for (a, _), (b, _) in zip(LeanGPTLM(dense, tokenizer).loglikelihood(requests, disable_tqdm=True),
                              LeanGPTLM(int8, tokenizer).loglikelihood(requests, disable_tqdm=True)):
        assert b == pytest.approx(a, abs=0.05 * abs(a))


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One request by a full forward pass of the model on the last block_size tokens."""
    tokens = (context + continuation)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0].float(), -1)[-len(continuation):]
    target = torch.tensor(continuation)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_is_a_direct_forward_at_any_batch_size(tiny_checkpoint, batch_size):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    long_context = " ".join(WORDS) * 3  # longer than the model's 64-token window: cut from the left
    args = [("The king", " walks"), ("Night and day", " the queen weeps."), (long_context, " gold"),
            ("", "The crown")]
    got = LeanGPTLM(model, tokenizer, batch_size).loglikelihood(instances("loglikelihood", args), disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(args, got):
        ids = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context)) if context else 0
        prefix = ids[:n_context] if context else [tokenizer.eos_id]
        want_logp, want_greedy = direct_loglikelihood(model, prefix, ids[n_context:])
        assert logp == pytest.approx(want_logp, abs=1e-4) and greedy == want_greedy


def test_rolling_loglikelihood_scores_consecutive_windows(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    text = " ".join(WORDS[::-1]) * 4
    [got] = LeanGPTLM(model, tokenizer).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    tokens = [tokenizer.eos_id] + tokenizer.encode(text)
    block, want = model.config.block_size, 0.0
    assert len(tokens) > 2 * block
    for start in range(0, len(tokens) - 1, block):  # every token after the first a target once
        window = tokens[start:start + block + 1]
        want += direct_loglikelihood(model, window[:1], window[1:])[0]
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_stops_at_the_until_string(tiny_checkpoint):
    from leangpt.generate import generate_ids
    from leangpt.sampling import SamplingConfig

    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    prompts = ["The king", "Night and day the queen"]
    args = [(p, {"until": ["."], "max_gen_toks": 24}) for p in prompts]
    got = LeanGPTLM(model, tokenizer, batch_size=2).generate_until(instances("generate_until", args))
    for prompt, text in zip(prompts, got):
        ids = list(generate_ids(model, tokenizer.encode(prompt), 24, SamplingConfig(temperature=0), eos_id=tokenizer.eos_id))
        greedy = tokenizer.decode(ids)
        assert "." not in text and text == greedy.split(".")[0]


def test_shakespeare_lambada_builds_the_same_files_from_a_dataset(dataset_dir, tmp_path):
    first = lambada.write_lambada_task(dataset_dir, tmp_path / "a", passages=40)
    second = lambada.write_lambada_task(dataset_dir, tmp_path / "b", passages=40)
    data = first.with_suffix(".jsonl")
    assert data.read_bytes() == second.with_suffix(".jsonl").read_bytes()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 40 and len({(r["context"], r["target"]) for r in rows}) == 40
    for row in rows:
        word = row["target"][1:]
        assert row["target"] == " " + word and word.isalpha() and len(word) >= 4
        assert word in re.findall(r"[A-Za-z]+", row["context"])
    config = yaml.safe_load(first.read_text())
    assert config["task"] == lambada.TASK and config["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    with pytest.raises(Exception, match="fewer than the 100000 asked for"):
        lambada.lambada_passages(dataset_dir, passages=100_000)


def unigram_perplexity(dataset_dir, tokenizer, targets: list[str]) -> float:
    """Perplexity of the target words under the train split's token frequencies (add-one smoothed)."""
    counts = np.bincount(np.asarray(Dataset(dataset_dir).tokens("train")), minlength=tokenizer.vocab_size) + 1
    logp = np.log(counts / counts.sum())
    return math.exp(-np.mean([logp[tokenizer.encode(t)].sum() for t in targets]))


def test_shakespeare_lambada_scores_a_trained_model_above_a_unigram_baseline(tiny_checkpoint, dataset_dir, tmp_path):
    result = evaluate(EvalSettings(model=tiny_checkpoint, data=dataset_dir, tasks=[lambada.TASK], lambada_passages=40,
                                   write_tasks=tmp_path, progress=False))
    metrics = result["tasks"][lambada.TASK]
    targets = [json.loads(line)["target"] for line in (tmp_path / f"{lambada.TASK}.jsonl").read_text().splitlines()]
    _, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    baseline = unigram_perplexity(dataset_dir, tokenizer, targets)
    assert metrics["samples"] == 40 and metrics["perplexity"] < 0.9 * baseline
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(metrics["acc"] * (1 - metrics["acc"]) / 39))
    assert metrics["perplexity_stderr"] > 0


def test_per_document_samples_give_a_paired_difference_finer_than_either_stderr(tiny_checkpoint, dataset_dir,
                                                                               tmp_path):
    from leangpt.evaluate import paired_difference
    from leangpt.quantize import QuantizeSettings, quantize

    quantize(QuantizeSettings(model=tiny_checkpoint, out=tmp_path / "int8", method="int8", progress=False))
    results = [evaluate(EvalSettings(model=m, data=dataset_dir, tasks=[lambada.TASK], lambada_passages=40,
                                     log_samples=True, progress=False)) for m in (tiny_checkpoint, tmp_path / "int8")]
    dense, int8 = (r["samples"][lambada.TASK] for r in results)
    assert set(dense) == {"acc", "perplexity"} and len(dense["acc"]) == 40  # perplexity's items: loglikelihoods
    metrics = results[0]["tasks"][lambada.TASK]
    assert np.mean(dense["acc"]) == pytest.approx(metrics["acc"])
    assert math.exp(-np.mean(dense["perplexity"])) == pytest.approx(metrics["perplexity"])
    assert paired_difference(dense["perplexity"], dense["perplexity"]) == {"mean": 0, "stderr": 0}
    diff = paired_difference(int8["perplexity"], dense["perplexity"])
    own_stderr = np.std(dense["perplexity"], ddof=1) / math.sqrt(40)
    assert abs(diff["mean"]) < own_stderr and diff["stderr"] < own_stderr / 5


def test_tasks_from_the_command_line(tiny_checkpoint, dataset_dir, tmp_path, capsys):
    task = write_choice_task(tmp_path)
    args = ["eval", "--model", str(tiny_checkpoint), "--tasks", f"{task},{lambada.TASK}", "--include-path",
            str(tmp_path), "--data", str(dataset_dir), "--lambada-passages", "20", "--limit", "6"]
    code, out, _ = run_cli(args + ["--json"], capsys)
    result = json.loads(out)
    assert code == 0 and set(result["tasks"]) == {task, lambada.TASK} and result["limit"] == 6
    assert result["tasks"][task]["samples"] == 6 and result["tasks"][task]["acc"] == 1
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and f"{task}: acc 1.0000 ± 0.0000" in out and f"{lambada.TASK}: perplexity" in out


@pytest.mark.parametrize("args, message", [
    (["--tasks", lambada.TASK], "give --data DIR"),
    (["--tasks", "x", "--reference", "{ckpt}"], "does not apply to --tasks"),
    (["--tasks", "x", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "x", "--include-path", "{tmp}/missing"], "directory not found"),
])
def test_bad_task_settings_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in args]
    code, _, err = run_cli(["eval", "--model", str(tiny_checkpoint), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_task_whose_dataset_is_missing_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    task = write_choice_task(tmp_path)
    (tmp_path / "tiny_choice.jsonl").unlink()  # as a hub dataset offline: lm-eval's error, on one line
    code, _, err = run_cli(["eval", "--model", str(tiny_checkpoint), "--tasks", task, "--include-path", str(tmp_path)],
                           capsys)
    assert code == 2 and "dataset cannot be loaded" in err and len(err.strip().splitlines()) == 1
