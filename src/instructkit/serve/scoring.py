"""Log-probabilities for `/v1/completions` (`logprobs`, `echo`) and the tokenizer routes that
lm-evaluation-harness's `local-completions` model reads (`/tokenizer_info`, `/tokenize`,
`/detokenize`), so log-likelihood benchmarks run against `instructkit serve`.

lm-eval asks for a context plus continuation with `echo: true, max_tokens: 1, logprobs: 1` and
reads `token_logprobs[ctxlen:-1]` (the prompt's own tokens after the context; the last entry is
the one generated token) and `top_logprobs` at the same positions (a continuation is "greedy"
when every token's log-probability equals the largest of its position). Both come from one
log-softmax here, so they compare exactly.
"""

from __future__ import annotations

import torch

# Positions whose full-vocabulary logits are alive at once (Gemma's 262,144 tokens: 64 MB).
_CHUNK = 64


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, ids: list[int], top: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """For every token of `ids` after the first: its log-probability given the tokens before it,
    and the `top` most likely tokens there (id -> log-probability); None for the first token,
    which nothing predicts. One forward pass over the whole sequence, in fp32."""
    hidden = model(torch.tensor([ids]), return_hidden=True)[0, :-1]  # (T-1, C): position i predicts ids[i+1]
    targets = torch.tensor(ids[1:])
    chosen: list[float | None] = [None]
    tops: list[dict[int, float] | None] = [None]
    for start in range(0, hidden.shape[0], _CHUNK):
        logprobs = full_logits(model, hidden[start : start + _CHUNK]).float().log_softmax(dim=-1)  # (n, V)
        chosen += logprobs.gather(1, targets[start : start + _CHUNK, None])[:, 0].tolist()
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            tops += [dict(zip(row_ids, row_values)) for row_ids, row_values in zip(indices.tolist(), values.tolist())]
        else:
            tops += [{} for _ in range(logprobs.shape[0])]
    return chosen, tops


def full_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (n, V) for every token. A quantized head that proposes a shortlist (decode/quantize.py
    ShortlistHead) leaves the rest at -inf, which is no log-probability: its exact fp32 rows
    score every token instead, soft-capped as the model's own head would (Gemma 2)."""
    head = model.lm_head
    exact = getattr(head, "exact_weight", None)
    if exact is None:
        return model.head(hidden)
    logits = hidden.float() @ exact.float().T
    cap = getattr(model.config, "final_softcap", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def openai_logprobs(tokenizer, ids: list[int], chosen: list[float | None], tops: list[dict[int, float] | None],
                    first_offset: int = 0) -> dict:
    """OpenAI's legacy completions `logprobs` object for tokens `ids`: tokens as text, their
    log-probabilities, the top alternatives keyed by their text, and each token's character offset."""
    tokens = [tokenizer.decode([token]) for token in ids]
    offsets, offset = [], first_offset
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top_logprobs = []
    for alternatives in tops:
        if alternatives is None:
            top_logprobs.append(None)
            continue
        named: dict[str, float] = {}
        for token, value in alternatives.items():  # two ids may read as the same text: keep the larger
            text = tokenizer.decode([token])
            named[text] = max(value, named.get(text, float("-inf")))
        top_logprobs.append(named)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top_logprobs, "text_offset": offsets}
