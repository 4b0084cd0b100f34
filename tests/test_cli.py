import importlib
import json
import subprocess
import sys

import pytest

from leangpt.__main__ import COMMANDS
from tests.conftest import run_cli


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "usage: leangpt " + command in out
    module = importlib.import_module(COMMANDS[command][0])
    for action in module.build_parser()._actions:
        assert action.help, f"{command}: option {action.option_strings} has no help text"


def test_top_level_usage_and_unknown_command(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "prepare" in out
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command" in err


def test_eval_json(tiny_checkpoint, dataset_dir, capsys):
    code, out, _ = run_cli(["eval", "--model", str(tiny_checkpoint), "--data", str(dataset_dir), "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and {"loss", "perplexity", "bits_per_byte"} <= set(result)
    assert result["bits_per_byte"] > 0 and result["perplexity"] > 1


def test_eval_library_call_matches_the_command(tiny_checkpoint, dataset_dir, capsys):
    from leangpt.evaluate import EvalSettings, evaluate

    argv = ["eval", "--model", str(tiny_checkpoint), "--data", str(dataset_dir), "--max-tokens", "256",
            "--reference", str(tiny_checkpoint), "--json"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    result = evaluate(EvalSettings(model=tiny_checkpoint, data=dataset_dir, max_tokens=256,
                                   reference=tiny_checkpoint, progress=False))
    assert json.loads(out) == json.loads(json.dumps(result))
    assert set(result) == {"model", "split", "loss", "perplexity", "bits_per_byte", "tokens", "bytes",
                           "kl", "top1_agreement", "reference"}
    assert result["tokens"] == 256 and result["kl"] == pytest.approx(0, abs=1e-6) and result["top1_agreement"] == 1


@pytest.mark.parametrize("args, message", [
    (["--block-size", "100000"], "--block-size must be in 1.."),
    (["--set", "batch_size=0"], "--batch-size must be >= 1"),
    (["--split", "test"], "expected one of val, train"),
])
def test_eval_rejects_bad_settings(tiny_checkpoint, dataset_dir, capsys, args, message):
    code, _, err = run_cli(["eval", "--model", str(tiny_checkpoint), "--data", str(dataset_dir), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_needs_data_unless_tasks(tiny_checkpoint, capsys):
    code, _, err = run_cli(["eval", "--model", str(tiny_checkpoint)], capsys)
    assert code == 2 and "--data is required" in err and len(err.strip().splitlines()) == 1


def test_eval_tasks_without_lm_eval_says_how_to_install_it(tiny_checkpoint, monkeypatch, capsys):
    import leangpt

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as when it is not installed
    monkeypatch.delitem(sys.modules, "leangpt.lm_eval_model", raising=False)
    monkeypatch.delattr(leangpt, "lm_eval_model", raising=False)
    code, _, err = run_cli(["eval", "--model", str(tiny_checkpoint), "--tasks", "hellaswag"], capsys)
    assert code == 2 and "pip install 'leangpt[eval]'" in err and len(err.strip().splitlines()) == 1


def test_generate_same_seed_same_text(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "The king", "--max-new-tokens", "20", "--seed", "7"]
    runs = [run_cli(args + ["--json"], capsys) for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]
    assert json.loads(runs[0][1])["text"]
    code, streamed, _ = run_cli(args, capsys)
    assert code == 0 and streamed.strip() == ("The king" + json.loads(runs[0][1])["text"]).strip()


def test_generate_rejects_too_long_request(tiny_checkpoint, capsys):
    code, _, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "500"], capsys)
    assert code == 2 and "exceed the context" in err


def test_user_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leangpt", "eval", "--model", str(tmp_path), "--data", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, dataset_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    code, _, err = run_cli(["train", "--data", str(dataset_dir), "--out", str(blocker / "ck"), "--preset", "tiny"], capsys)
    assert code == 2 and "is a file, not a directory" in err
