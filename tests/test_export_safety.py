"""`export --out` can replace only what an export made: never the model it reads, the current,
home or root folder, nor a folder of someone's files; a killed export's staging folder is
removed by the next export."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, chapter_data_path):
    out = tmp_path_factory.mktemp("export-safety") / "runs" / "run"
    result = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                     "--max-steps", "1", "--eval-batches", "1", "--no-sample")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _export(*args: str, cwd, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "instructkit", "export", "--format", "hf", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def _listing(folder) -> dict:
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))}


def test_out_may_not_touch_the_model_nor_the_current_home_or_root_folder(run, tmp_path):
    here, home = tmp_path / "a" / "work", tmp_path / "b" / "home"
    for folder in (here, home):
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    runs = run.parent
    cases = [
        (str(run), f"is the model being exported ({run})"),
        (str(runs), "contains the model being exported"),
        (str(run / "hf"), "lies inside the model being exported"),
        (".", f"is the current folder ({here})"),
        ("..", "contains the current folder"),
        (str(home), f"is your home folder ({home})"),
        ("/", "is the root folder"),
    ]
    before = {folder: _listing(folder) for folder in (runs, here, home)}
    for out, words in cases:
        result = _export("--run", str(run), "--out", out, "--force", cwd=here, home=home)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and f"--out {out}: {words}" in lines[0], (out, result.stderr)
    assert {folder: _listing(folder) for folder in (runs, here, home)} == before  # nothing deleted, nothing added


def test_force_replaces_a_previous_export_and_nothing_else(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused = _export("--run", str(run), "--out", str(mine), "--force", cwd=tmp_path, home=tmp_path)
    assert refused.returncode == 2 and "holds files that no export wrote (no instructkit-export.json)" in refused.stderr
    assert _listing(mine) == {"thesis.tex": 13}

    out = tmp_path / "hf"
    first = _export("--run", str(run), "--out", str(out), cwd=tmp_path, home=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((out / "instructkit-export.json").read_text())["format"] == "hf"
    (out / "extra.txt").write_text("left by the user inside the export")
    unforced = _export("--run", str(run), "--out", str(out), cwd=tmp_path, home=tmp_path)
    assert unforced.returncode == 2 and "exists and is not empty; pass --force" in unforced.stderr
    again = _export("--run", str(run), "--out", str(out), "--force", cwd=tmp_path, home=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"]  # no staging or previous folder left


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(run, tmp_path):
    """An export writes into `.NAME.export-PID-*` beside its target; a SIGKILL leaves that folder.
    The next export removes those whose process is gone, and keeps a running export's own."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited: its pid names a killed export
    out = tmp_path / "hf"
    stale = [tmp_path / f".hf.export-{dead_pid}-abc123", tmp_path / f".hf.export-{dead_pid}-abc123-previous"]
    running = tmp_path / f".hf.export-{os.getpid()}-xyz789"  # this test process is alive: an export in progress
    unrelated = [tmp_path / ".hf.backup", tmp_path / f".other.export-{dead_pid}-abc123"]
    for folder in [*stale, running, *unrelated]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    result = _export("--run", str(run), "--out", str(out), cwd=tmp_path, home=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any(folder.exists() for folder in stale)
    assert running.exists() and all(folder.exists() for folder in unrelated)
