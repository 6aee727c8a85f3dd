"""Text similarity at scale: normalisation for exact duplicates, TF-IDF of character 1-3-grams
(the chapter's near-duplicate method), and the pairs above a cosine threshold found three ways.

- `dense`: the full n x n similarity matrix, as the chapter computes it (small data, tests).
- `chunked`: a block of rows against all rows at a time, keeping only pairs above the threshold,
  so memory grows with n, not n^2. Frequent n-grams (present in more than 4% of the texts: the
  spaces, common letters and bigrams that nearly every pair shares) are multiplied as a small dense
  matrix with BLAS, the rest as a sparse product; the sum is exactly the cosine.
- `minhash`: MinHash-LSH (datasketch) on character 3-gram shingles proposes candidate pairs, which
  are then verified with the exact TF-IDF cosine, so no false positive survives (for ~100k texts
  and more, where even the chunked product gets slow).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import numpy as np

_PUNCTUATION_OR_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, lower case, whitespace and punctuation collapsed: exact duplicates up to formatting."""
    return _PUNCTUATION_OR_SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")


def preprocess(text: str) -> str:
    """The chapter's preprocessing for near-duplicates: lower case, punctuation removed."""
    return _NOT_WORD_OR_SPACE.sub("", text.lower())


def tfidf(texts: list[str]):
    """L2-normalised TF-IDF rows of character 1-3-grams of the preprocessed texts (scikit-learn),
    as the chapter's find-near-duplicates.py computes them."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), preprocessor=preprocess, dtype=np.float32)
    return vectorizer.fit_transform(texts).tocsr()


def dense_pairs(matrix, threshold: float) -> list[tuple[int, int, float]]:
    similarity = (matrix @ matrix.T).toarray()
    rows, columns = np.nonzero(np.triu(similarity >= threshold, k=1))
    return [(int(i), int(j), float(similarity[i, j])) for i, j in zip(rows, columns)]


def chunked_pairs(matrix, threshold: float, *, chunk: int = 512, progress: Callable[[int], None] | None = None,
                  frequent_share: float = 0.04) -> list[tuple[int, int, float]]:
    """Pairs (i < j) with cosine >= threshold, one block of `chunk` rows at a time.

    An n-gram in a share s of the texts costs ~n^2/2 multiply-adds as a dense column and ~(s n)^2/2
    as a sparse one, each at its own speed; measured on 20k Alpaca-like records, the dense part
    dominated with s > 1% (42 s against 1 s sparse), and the sum was lowest between 3% and 10%."""
    n = matrix.shape[0]
    document_frequency = np.diff(matrix.tocsc().indptr)
    frequent = np.flatnonzero(document_frequency > max(1, frequent_share * n))
    rare = np.setdiff1d(np.arange(matrix.shape[1]), frequent)
    common = np.ascontiguousarray(matrix[:, frequent].toarray())  # (n, F_frequent), small and dense
    sparse, sparse_t = matrix[:, rare].tocsr(), matrix[:, rare].T.tocsc()
    found = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # (b, n - start): row i against every later row (pairs are kept once, i < j).
        block = common[start:stop] @ common[start:].T
        block += (sparse[start:stop] @ sparse_t[:, start:]).toarray()
        rows, columns = np.nonzero(block >= threshold)
        later = rows < columns  # block[i, j] is the pair (start + i, start + j)
        rows, columns = rows[later], columns[later]
        found.extend(zip((rows + start).tolist(), (columns + start).tolist(), block[rows, columns].tolist()))
        if progress is not None:
            progress(stop - start)
    return found


def minhash_pairs(texts: list[str], matrix, threshold: float, *, num_perm: int = 128, lsh_threshold: float | None = None,
                  progress: Callable[[int], None] | None = None, verify_batch: int = 65_536) -> list[tuple[int, int, float]]:
    """MinHash-LSH candidates, verified with the exact cosine of the TF-IDF rows.

    Streaming, so memory holds the LSH index and the kept pairs, never all signatures or all
    candidates: each text first queries the index (so a pair is proposed once, by its later text),
    then joins it; proposed pairs are verified in vectorised batches of `verify_batch`."""
    from datasketch import MinHash, MinHashLSH

    # Jaccard on 3-gram shingles runs below the TF-IDF cosine for the same pair; ask LSH for a lower
    # Jaccard so it proposes every pair the cosine would keep (recall), verification removes the rest.
    lsh = MinHashLSH(threshold=lsh_threshold or max(0.2, threshold - 0.45), num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=1)
    permutations, scheme = template.permutations, template.scheme  # made once, shared by every signature
    found: list[tuple[int, int, float]] = []
    earlier: list[int] = []
    later: list[int] = []

    def verify() -> None:
        if not earlier:
            return
        first, second = np.asarray(earlier), np.asarray(later)
        cosine = np.asarray(matrix[first].multiply(matrix[second]).sum(axis=1)).ravel()  # (pairs,)
        kept = np.flatnonzero(cosine >= threshold)
        found.extend(zip(first[kept].tolist(), second[kept].tolist(), cosine[kept].tolist()))
        earlier.clear()
        later.clear()

    for index, text in enumerate(texts):
        signature = MinHash(num_perm=num_perm, seed=1, permutations=permutations, scheme=scheme)
        padded = f"  {text}  "
        signature.update_batch([padded[k : k + 3].encode("utf-8") for k in range(len(padded) - 2)])
        for other in lsh.query(signature):
            earlier.append(other)
            later.append(index)
        lsh.insert(index, signature, check_duplication=False)
        if len(earlier) >= verify_batch:
            verify()
        if progress is not None and index % 1000 == 999:
            progress(1000)
    verify()
    return sorted(found)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            members.setdefault(self.find(x), []).append(x)
        return [group for group in members.values() if len(group) > 1]
