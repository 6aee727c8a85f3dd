"""Damaged run folders and caches: one line naming the file and exit 2, or (for a cache) a rebuild;
never a traceback, never a model that loads silently and answers garbage."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from .conftest import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, chapter_data_path):
    out = tmp_path_factory.mktemp("corrupt") / "run"
    result = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                     "--max-steps", "1", "--eval-batches", "1", "--no-sample")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _overwrite_keeping_times(path, offset_from_end: int, data: bytes) -> None:
    """Change bytes inside the tensor data, then put the modification time back, as a copy tool or
    bit rot would leave it: only the checksum (and the change time) can tell."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size - offset_from_end)
        handle.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _write(path, text: str) -> None:
    path.write_text(text)


DAMAGES = {
    "overwritten weights": ("model.safetensors", lambda p: _overwrite_keeping_times(p, 64, b"\x7f" * 16), "checksum mismatch"),
    "truncated weights": ("model.safetensors", lambda p: _truncate(p, p.stat().st_size // 2), "checksum mismatch"),
    "zero-byte weights": ("model.safetensors", lambda p: _truncate(p, 0), "checksum mismatch"),
    "malformed model.json": ("model.json", lambda p: _write(p, '{"family": "gpt2", "conf'), "not valid JSON"),
    "model.json without a config": ("model.json", lambda p: _write(p, '{"family": "gpt2"}'), "not a model description"),
    "malformed prompt_style.json": ("prompt_style.json", lambda p: _write(p, '{"name": "alpaca", '), "not valid JSON"),
    "prompt style of the wrong types": ("prompt_style.json", lambda p: _write(p, json.dumps(
        {"name": "x", "instruction_prefix": 1, "input_prefix": "", "response_prefix": ""})), "'instruction_prefix' must be a string"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_folder_is_one_line_naming_the_file(run, tmp_path, damage):
    name, spoil, words = DAMAGES[damage]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    spoil(copy / name)
    out = tmp_path / "responses.json"
    result = run_cli("respond", "--run", str(copy), "--max-new-tokens", "2", "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"instructkit: error: {copy / name}: ") and words in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("size", [0, 1000, "half"])
def test_truncated_weights_of_a_folder_without_a_checksum_are_one_line(run, tmp_path, size):
    """Model folders written before checksums were recorded still load, and a truncated weight
    file there is one line too (safetensors' own error, named), not a traceback."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "model.json").read_text())
    del meta["weights_sha256"]
    (copy / "model.json").write_text(json.dumps(meta))
    assert run_cli("generate", "--model", str(copy), "--prompt", "Hi", "--max-new-tokens", "2").returncode == 0
    weights = copy / "model.safetensors"
    _truncate(weights, weights.stat().st_size // 2 if size == "half" else size)
    result = run_cli("generate", "--model", str(copy), "--prompt", "Hi", "--max-new-tokens", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"instructkit: error: {weights}: not a complete safetensors file"), lines[0]


def test_a_verified_copy_loads_and_its_checksum_is_recorded(run, tmp_path):
    meta = json.loads((run / "model.json").read_text())
    from instructkit.fileio import sha256_of_file

    assert meta["weights_sha256"] == sha256_of_file(run / "model.safetensors")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # a copy: another inode, so the stamp no longer vouches for it; hashed again
    result = run_cli("generate", "--model", str(copy), "--prompt", "Hi", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_truncated_quantized_cache_is_rebuilt_in_place(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = ["generate", "--model", str(copy), "--prompt", "Hi", "--max-new-tokens", "4", "--quantize", "int8"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    cache = copy / "quantized-int8.safetensors"
    whole = cache.stat().st_size
    _truncate(cache, whole // 3)
    again = run_cli(*args)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"{cache} is damaged" in again.stderr and again.stdout == first.stdout
    assert cache.stat().st_size == whole and load_file(str(cache))  # whole again, and readable
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
