"""Beam search: the K most likely continuations of each prompt kept at every step, the best
finished one returned (`respond --beams K`, and the main job's test responses on the chapter's
data, where it was chosen on the validation split: docs/BENCHMARKS.md).

The rules are Hugging Face transformers' `generate(num_beams=K, length_penalty=A)` with its
default `early_stopping=False`, so a test compares the two token for token:
- every step, each prompt looks at the top (1 + number of stop ids, at least 2) x K candidates
  over its K beams x vocabulary, ranked by summed log-probability;
- a candidate that ends (a stop token, or the token budget) joins the prompt's finished pool only
  if it ranks in the top K, scored summed log-probability / generated length ** A (the stop token
  counted); the pool keeps its best K;
- the best K candidates that did not end go on;
- a prompt is done when its pool holds K and the best running beam, scored at its current length,
  does not beat the pool's worst (HF's heuristic), or at the token budget.
`repeat_stop` (ours, not HF's) also ends a candidate whose last tokens repeat, dropping the repeat,
as greedy decoding does (generate.Request).

Prompts are searched in groups (K rows each in one KV cache); a prompt that is done leaves the
batch, so a group costs what its longest search costs, not K x the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from instructkit.decode.generate import Generated, _fit_prompt, prefill, repeats_itself
from instructkit.models.tokenizer import Tokenizer

# What HF writes for "impossible" (a beam that cannot win); a float, not -inf, so sums stay finite.
NEVER = -1.0e9


@dataclass
class _Finished:
    score: float  # summed log-probability / length ** length_penalty
    tokens: list[int]  # without the stop token
    reason: str  # "stop_token", "length", "repeat"


@dataclass
class _Search:
    """One prompt's search: K running beams (token lists and summed log-probabilities) and the pool."""

    beams: list[list[int]]
    scores: list[float]
    pool: list[_Finished]


@torch.no_grad()
def beam_search(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]], *, beams: int = 4,
                length_penalty: float = 1.0, max_new_tokens: int = 256, stop_ids: Sequence[int] = (),
                repeat_stop: int = 0, prompt_batch: int = 16) -> list[Generated]:
    """The best finished beam of every prompt (lists of token ids), in the prompts' order."""
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    results: list[Generated | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for start in range(0, len(order), prompt_batch):
        group = order[start : start + prompt_batch]
        found = _search_group(model, tokenizer, [list(prompts[i]) for i in group], beams, length_penalty,
                              max_new_tokens, frozenset(stop_ids), repeat_stop)
        for index, result in zip(group, found):
            results[index] = result
    return results


def _search_group(model, tokenizer, prompts, k, length_penalty, max_new_tokens, stop_ids, repeat_stop):
    context = model.config.context_length
    budget = max(1, min(max_new_tokens, context - 1))
    prompts = [_fit_prompt(prompt, budget, context) for prompt in prompts]
    cache, logits, next_position = prefill(model, tokenizer.pad_id, prompts, budget)
    # Every prompt's row becomes K rows (k consecutive rows per prompt); only the first beam starts
    # alive, so the first step picks K different tokens rather than K copies of one.
    rows = torch.arange(len(prompts)).repeat_interleave(k)
    cache.keep_rows(rows.to(next_position.device))
    logits, next_position = logits[rows], next_position[rows]
    searches = [_Search([[] for _ in range(k)], [0.0] + [NEVER] * (k - 1), []) for _ in prompts]
    active = list(range(len(prompts)))  # prompts still searching, in the order of their row blocks
    looked_at = max(2, 1 + len(stop_ids)) * k
    for length in range(1, budget + 1):  # tokens generated, counting the one chosen now
        vocab = logits.shape[-1]
        running = torch.tensor([searches[p].scores for p in active])  # (P, K)
        totals = torch.log_softmax(logits.float(), dim=-1).view(len(active), k, vocab) + running[:, :, None]
        top_scores, top_index = totals.view(len(active), k * vocab).topk(looked_at)  # (P, looked_at)
        top_scores, top_beam, top_token = top_scores.tolist(), (top_index // vocab).tolist(), (top_index % vocab).tolist()
        keep_rows, next_tokens, still_active = [], [], []
        for slot, p in enumerate(active):
            search = searches[p]
            going: list[tuple[float, int, list[int]]] = []  # (summed log-probability, source beam, tokens)
            for rank, (score, beam, token) in enumerate(zip(top_scores[slot], top_beam[slot], top_token[slot])):
                tokens = search.beams[beam] + [token]
                if token in stop_ids:
                    ended = _Finished(score, search.beams[beam], "stop_token")
                elif length >= budget:
                    ended = _Finished(score, tokens, "length")
                elif repeat_stop and repeats_itself(tokens, repeat_stop):
                    ended = _Finished(score, tokens[:-repeat_stop], "repeat")
                else:
                    if len(going) < k:
                        going.append((score, beam, tokens))
                    continue
                if rank < k:  # a lower-ranked ending only kept the search supplied with beams
                    ended.score = score / length**length_penalty
                    search.pool.append(ended)
            search.pool = sorted(search.pool, key=lambda f: -f.score)[:k]
            if not going:  # every candidate ended: the pool holds the answer
                continue
            while len(going) < k:  # too few live candidates: fill with ones that cannot win
                going.append((NEVER, going[0][1], going[0][2]))
            search.beams, search.scores = [tokens for _, _, tokens in going], [score for score, _, _ in going]
            best_possible = search.scores[0] / length**length_penalty
            if len(search.pool) == k and best_possible <= search.pool[-1].score:
                continue  # no running beam can beat the pool's worst (HF's heuristic)
            still_active.append(p)
            keep_rows += [slot * k + beam for _, beam, _ in going]
            next_tokens += [tokens[-1] for _, _, tokens in going]
        active = still_active
        if not active:
            break
        index = torch.tensor(keep_rows, device=next_position.device)
        cache.keep_rows(index)
        next_position = next_position[index]
        device = next_position.device
        hidden = model(torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None],
                       positions=next_position[:, None], cache=cache, return_hidden=True)
        logits = model.head(hidden[:, -1])
        next_position = next_position + 1
    results = []
    for search in searches:
        best = search.pool[0] if search.pool else _Finished(search.scores[0], search.beams[0], "length")
        results.append(Generated(best.tokens, tokenizer.decode(best.tokens), best.reason))
    return results
