"""Where instruction data comes from: a local path, an http(s) URL, or a named source.

URLs are downloaded once into the cache folder (atomic write), with their size and sha256
kept beside the file, so a later run reuses the copy offline and notices a damaged one.
"""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, cache_dir, sha256_of_file

NAMED_SOURCES: dict[str, str] = {
    # The chapter's 1,100 entries (rasbt/LLMs-from-scratch, ch07/01_main-chapter-code).
    "chapter7": "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data.json",
    # Stanford Alpaca's 52k entries, as used by the chapter's exercise 7.3.
    "alpaca52k": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
}


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_source(source: str, *, timeout: float = 60.0) -> Path:
    """Return a local file for `source` (a named source, a URL or a path), downloading if needed."""
    if source in NAMED_SOURCES:
        return download_cached(NAMED_SOURCES[source], name=f"{source}.json", timeout=timeout)
    if is_url(source):
        file_name = source.rstrip("/").rsplit("/", 1)[-1] or "download.json"
        return download_cached(source, name=file_name, timeout=timeout)
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(sorted(NAMED_SOURCES))
        raise UserError(f"{source}: no such file (give a path, an http(s) URL, or one of: {names})")
    if path.is_dir():
        raise UserError(f"{source}: is a folder, expected a JSON or JSONL file")
    return path


def _download_folder(url: str) -> Path:
    import hashlib

    # One folder per URL, so two sources with the same file name never overwrite each other.
    return cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]


def download_cached(url: str, *, name: str, timeout: float = 60.0) -> Path:
    folder = _download_folder(url)
    target = folder / name
    meta_path = folder / (name + ".meta.json")
    if target.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if target.stat().st_size == meta.get("size") and sha256_of_file(target) == meta.get("sha256"):
            return target
    return _download(url, target, meta_path, timeout)


def _download(url: str, target: Path, meta_path: Path, timeout: float) -> Path:
    import hashlib
    import os
    import tempfile

    import httpx

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as handle, httpx.stream(
            "GET", url, timeout=timeout, follow_redirects=True
        ) as response:
            if response.status_code != 200:
                raise UserError(f"{url}: download failed with HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except httpx.HTTPError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise UserError(
            f"{url}: download failed ({type(exc).__name__}: {exc}); check the network, "
            "or download the file yourself and pass its local path"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    atomic_write_json(meta_path, {"url": url, "size": size, "sha256": digest.hexdigest()})
    return target
