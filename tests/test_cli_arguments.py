"""The CLI's argument checks: a value out of range is one line naming the option, exit 2, before
any model is loaded or any file written; every command shares the same checks."""

import pytest
import torch

from instructkit.cli import main

from .conftest import run_cli


@pytest.mark.parametrize("args, words", [
    (["serve", "--model", "tiny-gpt2", "--prompt-style", "alpaca", "--port", "99999"],
     "argument --port: must be a port from 0 to 65535 (0 picks a free one), got 99999"),
    (["serve", "--model", "tiny-gpt2", "--prompt-style", "alpaca", "--port", "-1"], "argument --port: must be a port"),
    (["serve", "--model", "tiny-gpt2", "--prompt-style", "alpaca", "--port", "http"],
     "argument --port: must be a port from 0 to 65535 (0 picks a free one), got 'http'"),
    (["serve", "--model", "tiny-gpt2", "--prompt-style", "alpaca", "--threads", "0"],
     "argument --threads: must be a positive integer, got 0"),
    (["chat", "--model", "tiny-gpt2", "--prompt-style", "alpaca", "--threads", "-2"],
     "argument --threads: must be a positive integer, got -2"),
    (["respond", "--model", "tiny-gpt2", "--data", "builtin", "--threads", "0"],
     "argument --threads: must be a positive integer, got 0"),
    (["leakage", "--data", "builtin", "--method", "bogus"],
     "argument --method: invalid choice: 'bogus' (choose from"),
    (["generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--temperature", "-1"],
     "argument --temperature: must be 0 or a positive number, got -1"),
    (["generate", "--model", "tiny-gpt2", "--prompt", "Hi", "--temperature", "nan"],
     "argument --temperature: must be 0 or a positive number, got nan"),
    (["evaluate", "--responses", "r.json", "--judge-max-failures", "1.5"],
     "argument --judge-max-failures: must be a share from 0 to 1 (or 0% to 100%), got 1.5"),
    (["evaluate", "--responses", "r.json", "--judge-timeout", "0"], "argument --judge-timeout: must be a positive number"),
    (["evaluate", "--responses", "r.json", "--judge-retries", "-1"], "argument --judge-retries: must be 0 or a positive"),
    (["evaluate", "--responses", "r.json", "--judge-concurrency", "0"], "argument --judge-concurrency: must be a positive"),
    (["evaluate", "--responses", "r.json", "--judge-api", "vllm"], "argument --judge-api: invalid choice: 'vllm'"),
    (["run", "--judge-prompt", "fancy"], "argument --judge-prompt: invalid choice: 'fancy'"),
])
def test_a_bad_value_is_one_line_and_exit_2(args, words, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert result.stderr.startswith(f"instructkit {args[0]}: error: ") and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_judge_max_failures_takes_a_share_or_a_percentage():
    from instructkit.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["evaluate", "--judge-max-failures", "25%"]).judge_max_failures == 0.25
    assert parse(["evaluate", "--judge-max-failures", "0.25"]).judge_max_failures == 0.25
    assert parse(["evaluate"]).judge_max_failures == 0.1


def test_respond_takes_threads(chapter_data_path, tmp_path):
    """The real command in this process, so the thread count it set can be read back."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    out = tmp_path / "responses.json"
    try:
        status = main(["respond", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--split", "val",
                       "--out", str(out), "--max-new-tokens", "2", "--threads", str(wanted)])
        assert status == 0 and torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
    assert out.exists()
