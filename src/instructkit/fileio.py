"""Atomic file writes and checksums.

Every file instructkit produces goes through these helpers: the bytes are written to a
temporary file in the same folder, flushed to disk, then renamed over the target. A process
killed at any moment leaves either the old complete file or the new complete file, never a
truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def _umask_mode() -> int:
    # mkstemp creates files readable by the owner only; give them the usual permissions.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a uniquely named temporary file beside `path`, which is then fsynced and
    renamed over it: for writers that take a file name (safetensors' save_file) and whose output is
    too large to hold twice in memory. Two processes writing the same target never share a temp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.chmod(tmp_name, _umask_mode())  # after `write`, which may have made the file anew (0600)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 4) -> Path:
    # ensure_ascii=False keeps non-English text readable, as the chapter's files are.
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text. Only "\n" ends a line: `str.splitlines()` would also break on
    U+2028, U+2029 and U+0085, which JSON strings written with ensure_ascii=False contain raw."""
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every complete row of a JSONL file we wrote; a torn last line (a kill mid-write) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append rows and make them durable before returning (resumable outputs grow this way)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp_name, _umask_mode())
    try:
        shutil.copyfile(source, tmp_name)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def sha256_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloads and converted weights live: $INSTRUCTKIT_CACHE or ~/.cache/instructkit."""
    root = os.environ.get("INSTRUCTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "instructkit"
    )
    return Path(root)
