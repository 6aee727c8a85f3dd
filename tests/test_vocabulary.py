"""Block-wise argmax and top-k over the vocabulary (decode/vocabulary.py) answer exactly what
PyTorch's `argmax` and `topk` answer, on Gemma's vocabulary size and others, with ties and NaN."""

import pytest
import torch

from instructkit.decode.vocabulary import greedy, top_candidates


@pytest.mark.parametrize("vocab", [262_144, 50_257, 4_096, 1_000])
def test_block_search_equals_pytorchs(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    logits[1] = float("-inf")  # a shortlist head's rows are -inf outside the candidates
    logits[1, torch.randint(0, vocab, (32,), generator=generator)] = torch.randn(32, generator=generator)
    logits[2] = logits[2].round()  # many ties: the first index of the maximum wins, as in argmax
    logits[3, vocab // 3] = float("nan")  # argmax treats NaN as the maximum
    logits[4] = 0.0  # all equal
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    finite = logits[[0, 1]]
    assert torch.equal(top_candidates(finite, 32), finite.topk(32, dim=-1).indices)
    tied = logits[2:3]  # with ties, which of the equal values comes first may differ; the values may not
    assert torch.equal(tied.gather(-1, top_candidates(tied, 32)), tied.topk(32, dim=-1).values)
