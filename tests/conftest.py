"""Shared fixtures. Tests never touch the network; the chapter's data is read from ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHAPTER_DATA = SHARED_DATA / "instruction-data.json"


def _require_shared(path: Path) -> Path:
    """The chapter's files sit in ../shared/data beside the repo. Outside CI a clone without them
    skips these tests; in CI (CI=true) their absence is an error, so nothing is silently skipped."""
    if not path.exists():
        message = f"{path} not found (the chapter's data sits in ../shared/data beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str):
    """Import a test dependency. Outside CI a missing one skips the test module; under CI=true it
    fails, so a CI run never passes with core tests silently skipped."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"test dependency {name!r} is not installed ({exc}); `make test` installs it"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def require_program(path: str, how: str) -> str:
    """A program the tests drive (chromium, go): skipped without it outside CI, failed under CI."""
    import shutil

    found = shutil.which(path)
    if found is None:
        message = f"{path} not found ({how})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def chapter_data_path() -> Path:
    return _require_shared(CHAPTER_DATA)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require_shared(SHARED_DATA)


@pytest.fixture(scope="session")
def gpt2():
    from instructkit.models.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m instructkit ...` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def kill_at_checkpoint(args: list[str], run: Path, step: int, *, timeout: float = 300, group: bool = False) -> None:
    """Start `instructkit ARGS`, wait until the checkpoint in `run` has reached `step`, then SIGKILL
    it (with `group`, its whole process group: a launcher and its workers). The run must not have
    finished by then."""
    import json
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "instructkit", *args], start_new_session=group,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= step:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"


def sorting_conversations(count: int) -> list[dict]:
    """`count` two-turn conversations (messages records) whose second question depends on the
    first answer: "Sort these: ..." then "Now only the first two."."""
    rows = []
    for i in range(count):
        numbers = [(i * 7 + k * 13) % 97 for k in range(4)]
        rows.append({"messages": [
            {"role": "user", "content": f"Sort these: {', '.join(map(str, numbers))}"},
            {"role": "assistant", "content": ", ".join(map(str, sorted(numbers)))},
            {"role": "user", "content": "Now only the first two."},
            {"role": "assistant", "content": ", ".join(map(str, sorted(numbers)[:2]))}]})
    return rows


def merged_plain_model(model):
    """A model of `model`'s config without adapters, loaded (strictly: every name the plain
    model's) from train/lora.merged_state, each lazy weight made here: what a LoRA run saves."""
    import torch

    from instructkit.models.checkpoints import LazyTensor
    from instructkit.models.registry import build_model
    from instructkit.train.lora import merged_state

    state = {name: value.make() if isinstance(value, LazyTensor) else value for name, value in merged_state(model).items()}
    plain = build_model(model.config)
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    return plain.eval().requires_grad_(False).to(torch.float32)
