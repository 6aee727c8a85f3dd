"""Where instruction data comes from: a local path, an http(s) URL, or a named source.

URLs are downloaded once into the cache folder (atomic write), with their size and sha256
kept beside the file, so a later run reuses the copy offline and notices a damaged one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, cache_dir, sha256_of_file

@dataclass(frozen=True)
class NamedSource:
    """A download pinned to one commit and checked against its content hash, so a named source
    always means the same bytes. `git_blob_sha1` is git's own id of the file (sha1 of
    "blob <size>\\0" + bytes), used where only git's listing of a file could be read."""

    url: str
    sha256: str | None = None
    git_blob_sha1: str | None = None


NAMED_SOURCES: dict[str, NamedSource] = {
    # The chapter's 1,100 entries (rasbt/LLMs-from-scratch, ch07/01_main-chapter-code).
    "chapter7": NamedSource(
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/"
        "ch07/01_main-chapter-code/instruction-data.json",
        sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
    # Stanford Alpaca's 52k entries, as used by the chapter's exercise 7.3.
    "alpaca52k": NamedSource(
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/"
        "alpaca_data.json",
        git_blob_sha1="3779ddbc040543ab1834ef216c983d6fcc06cc9a"),
}
DOWNLOAD_ATTEMPTS = 3


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_source(source: str, *, timeout: float = 60.0) -> Path:
    """Return a local file for `source` (a named source, a URL, `hf:owner/name[:split]`, a folder
    saved by `datasets`, or a path), downloading if needed."""
    if source.startswith("hf:"):
        return _from_datasets(source)
    if source in NAMED_SOURCES:
        return download_cached(NAMED_SOURCES[source].url, name=f"{source}.json", timeout=timeout,
                               pinned=NAMED_SOURCES[source])
    if is_url(source):
        file_name = source.rstrip("/").rsplit("/", 1)[-1] or "download.json"
        return download_cached(source, name=file_name, timeout=timeout)
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(sorted(NAMED_SOURCES))
        raise UserError(f"{source}: no such file (give a path, an http(s) URL, or one of: {names})")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _from_datasets(source)
        raise UserError(f"{source}: is a folder, expected a data file (JSON, JSONL, Parquet, Arrow, CSV) or a "
                        "dataset saved by the datasets library")
    return path


def _from_datasets(source: str) -> Path:
    """A Hugging Face dataset (`hf:owner/name[:split]`, default split train; or a folder written by
    `save_to_disk`) read with the `datasets` library and kept as a JSONL file in the cache, named
    by the dataset's fingerprint, so the rest of the pipeline reads one file kind."""
    import datasets

    hub = source.startswith("hf:")
    name, _, split = source.removeprefix("hf:").partition(":")
    split = split or "train"
    try:
        if hub:
            dataset = datasets.load_dataset(name, split=split)
        else:
            dataset = datasets.load_from_disk(source)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UserError(f"{source}: has splits {', '.join(dataset)}, not {split!r}")
                dataset = dataset[split]
    except UserError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = any(word in text.lower() for word in ("offline", "connection", "resolve", "internet", "couldn't reach"))
        if hub and offline:
            raise UserError(f"{source}: the dataset {name!r} is not in the local Hugging Face cache and the Hub cannot "
                            "be reached; download it once with a network (or give a local file)") from None
        raise UserError(f"{source}: the datasets library could not read it ({type(exc).__name__}: {text[:200]})") from None
    target = cache_dir() / "datasets" / f"{name.replace('/', '--') if hub else Path(source).name}-{split}-{dataset._fingerprint}.jsonl"
    if not target.exists():
        from instructkit.fileio import atomic_write_text

        atomic_write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset))
    return target


def _download_folder(url: str) -> Path:
    import hashlib

    # One folder per URL, so two sources with the same file name never overwrite each other.
    return cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _git_blob_sha1(path: Path) -> str:
    import hashlib

    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matches_pin(path: Path, pinned: NamedSource | None) -> str | None:
    """None if the file has the pinned content (or nothing is pinned), else what differs."""
    if pinned is None:
        return None
    if pinned.sha256 and (actual := sha256_of_file(path)) != pinned.sha256:
        return f"sha256 {actual[:16]}..., expected {pinned.sha256[:16]}..."
    if pinned.git_blob_sha1 and (actual := _git_blob_sha1(path)) != pinned.git_blob_sha1:
        return f"git blob {actual[:16]}..., expected {pinned.git_blob_sha1[:16]}..."
    return None


def download_cached(url: str, *, name: str, timeout: float = 60.0, pinned: NamedSource | None = None) -> Path:
    folder = _download_folder(url)
    target = folder / name
    meta_path = folder / (name + ".meta.json")
    if target.exists() and meta_path.exists():
        meta = _read_meta(meta_path)
        if (target.stat().st_size == meta.get("size") and sha256_of_file(target) == meta.get("sha256")
                and _matches_pin(target, pinned) is None):
            return target
    problem = ""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            _download(url, target, meta_path, timeout)
        except TruncatedDownload as exc:
            problem = str(exc)
            continue
        problem = _matches_pin(target, pinned) or ""
        if not problem:
            return target
    target.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    raise UserError(f"{url}: download failed {DOWNLOAD_ATTEMPTS} times ({problem}); check the network, "
                    "or download the file yourself and pass its local path")


def _read_meta(path: Path) -> dict:
    """The size and checksum kept beside a download; a damaged record (a full disk, an edit) is no
    record, so the file is fetched again rather than trusted or a traceback shown."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


class TruncatedDownload(Exception):
    """Fewer bytes arrived than the server announced."""


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
            announced = response.headers.get("content-length")
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            for chunk in response.iter_bytes():
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
            if announced is not None and not encoded and size != int(announced):
                raise TruncatedDownload(f"{size} of {announced} bytes arrived")
        os.replace(tmp_name, target)
    except httpx.HTTPError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, httpx.RemoteProtocolError):  # the connection closed early: a truncated body
            raise TruncatedDownload(f"{type(exc).__name__}: {exc}") from None
        raise UserError(
            f"{url}: download failed ({type(exc).__name__}: {exc}); check the network, "
            "or download the file yourself and pass its local path"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    atomic_write_json(meta_path, {"url": url, "size": size, "sha256": digest.hexdigest()})
    return target
