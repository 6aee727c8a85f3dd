"""`python -m bench smoothing`: a rejected candidate for faster int8 decoding, measured so the
rejection can be checked: an int8 MLP (weights *and* inputs in int8 on FBGEMM) made accurate by
SmoothQuant's rescaling of input channels (Xiao et al., 2022), on top of the library's int8 mode
(decode/quantize.py; int8 head behind an fp32-rescored shortlist).

Why it was tried (2026-12-04, when the library's int8 body was fp16): batch-1 decoding reads every
weight once a token; the MLP was ~141 of the ~370 MB int8 read, and an int8 MLP halves that (this
suite times it: batch-1 greedy tokens/s, eager, the two interleaved in rounds, 3 prompts x 128
tokens). Since 2026-12-05 the library's own body is weight-only int8 in groups of 32 (a C++ kernel
that keeps inputs in fp32), so the candidate now competes with that.
Why it is rejected (the numbers this suite prints):
  - agreement: teacher-forced greedy agreement with fp32 on validation prompts stays under the
    99% target at every smoothing strength tried;
  - batched == single: FBGEMM quantizes a layer's input, so a 1-ulp difference in it (attention's
    fp32 sums differ with padding and cache length between a batch and a single row) can cross
    an int8 step, and the token streams of a batch and of its rows alone part ways. The library's
    int8 keeps every body input in floating point, so such differences stay at the 1e-7 level.

Smoothing: s (K,) = max|x_k|^alpha / max|W_:,k|^(1-alpha) per input channel, with max|x_k| from
32 built-in training records (prompt and answer); the layer computes (x / s) (W * s)^T through
the library's Int8RowLinear (per-row input scaling, per-row int8 weights).
Prompts: the first 20 records of the built-in data's validation split and, where ../shared/data
is beside the project, the first 20 of the chapter's validation split (its last 5%), in Gemma's
prompt style; the reference is fp32's greedy continuation of 64 tokens, scored as
tests/test_quantize.py scores int8 (at every generated position both models see the fp32
continuation so far; their next-token choices are compared).
"""

from __future__ import annotations

import copy
import json
import time

import torch

from bench.common import CHAPTER, fmt_spread, print_table, spread

ALPHAS = (0.5, 0.65, 0.8, 0.9)
PROMPTS_PER_SOURCE, TOKENS, CALIBRATION_RECORDS = 20, 64, 32
SHIPPED = "int8 as shipped (its MLP: weight-only int8 in groups of 32 since 2026-12-05; fp16 before)"


class SmoothedInt8Linear(torch.nn.Module):
    """y = (x / s) (W * s)^T with W * s in per-row int8 and x / s quantized by FBGEMM per call."""

    def __init__(self, weight: torch.Tensor, input_max: torch.Tensor, alpha: float):
        from instructkit.decode.quantize import Int8RowLinear

        super().__init__()
        weight_max = weight.abs().amax(dim=0).clamp(min=1e-5)  # (K,)
        self.smooth = (input_max.clamp(min=1e-5) ** alpha / weight_max ** (1 - alpha)).clamp(min=1e-5)
        self.inner = Int8RowLinear(Int8RowLinear.quantize(weight * self.smooth[None, :]), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.smooth)


def _records(quick: bool) -> tuple[list[dict], list[dict]]:
    """(calibration records from the built-in train split, validation records)."""
    from instructkit.data.builtin import generate_builtin, split_sizes

    builtin = generate_builtin()
    sizes = split_sizes(len(builtin))  # the file is laid out train, test, validation
    calibration = builtin[: min(CALIBRATION_RECORDS, sizes["train"])]
    validation = builtin[sizes["train"] + sizes["test"] :][: 2 if quick else PROMPTS_PER_SOURCE]
    if CHAPTER.exists() and not quick:
        chapter = json.loads(CHAPTER.read_text())
        validation += chapter[len(chapter) - len(chapter) // 20 :][:PROMPTS_PER_SOURCE]
    return calibration, validation


def _mlp_input_maxima(model, names: list[str], sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    maxima: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(record(name)) for name in names]
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]), return_hidden=True)
    for hook in hooks:
        hook.remove()
    return maxima


def _choices(model, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Next-token choices at every generated position of every sequence, under teacher forcing."""
    picked = []
    with torch.no_grad():
        for prompt, continuation in sequences:
            picked.append(model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1 : -1].argmax(-1))
    return torch.cat(picked)


def _batched_vs_single(model, tokenizer, prompts: list[list[int]], tokens: int) -> int:
    """How many prompts' greedy streams differ between one batch of all prompts and each alone."""
    from instructkit.decode.generate import generate

    together = generate(model, tokenizer, prompts, max_new_tokens=tokens, stop_ids=())
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=tokens, stop_ids=())[0] for prompt in prompts]
    return sum(a.token_ids != b.token_ids for a, b in zip(together, alone))


def _decode_speed(models: dict[str, torch.nn.Module], tokenizer, prompts: list[list[int]], budget: int,
                  repeats: int) -> dict[str, dict]:
    """Batch-1 greedy tokens/s (eager), the candidates interleaved in each round, in this process."""
    from instructkit.decode.generate import generate

    rates: dict[str, list[float]] = {label: [] for label in models}
    for model in models.values():
        generate(model, tokenizer, [prompts[0]], max_new_tokens=4)  # warm-up
    for _ in range(repeats):
        for label, model in models.items():
            start, tokens = time.perf_counter(), 0
            for prompt in prompts:
                tokens += len(generate(model, tokenizer, [prompt], max_new_tokens=budget, stop_ids=())[0].token_ids)
            rates[label].append(tokens / (time.perf_counter() - start))
    return {label: spread(values) for label, values in rates.items()}


def run(quick: bool, repeats: int = 3) -> dict:
    from instructkit.data.prompts import GEMMA
    from instructkit.decode.generate import generate
    from instructkit.decode.quantize import quantize_model
    from instructkit.models.families import family_of
    from instructkit.models.registry import load_model

    name = "tiny-gemma3" if quick else "gemma-3-270m"
    reference = load_model(name, seed=1)
    model, tokenizer = reference.model, reference.tokenizer
    calibration_records, validation = _records(quick)
    prompts = [tokenizer.encode(GEMMA.prompt(record)) for record in validation]
    tokens = 8 if quick else TOKENS
    results = generate(model, tokenizer, prompts, max_new_tokens=tokens, stop_ids=())
    sequences = [(prompt, result.token_ids) for prompt, result in zip(prompts, results)]
    exact = _choices(model, sequences)

    mlp_suffixes = family_of(model.config.family).lora_targets["mlp"]
    mlp_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(mlp_suffixes)]
    calibration = [tokenizer.encode(GEMMA.prompt(record) + record["output"]) for record in calibration_records]
    maxima = _mlp_input_maxima(model, mlp_names, calibration)
    # Unstacked (fuse=False): the candidates replace gate_proj and up_proj one by one.
    library_int8 = quantize_model(copy.deepcopy(model), "int8", fuse=False)

    def smoothed(alpha: float):
        candidate = copy.deepcopy(library_int8)
        weights = dict(model.named_modules())
        for layer in mlp_names:  # the candidate replaces the library's MLP products by its own
            parent, _, child = layer.rpartition(".")
            replacement = SmoothedInt8Linear(weights[layer].weight.detach().float(), maxima[layer], alpha)
            setattr(candidate.get_submodule(parent), child, replacement)
        return candidate

    rows = {SHIPPED: {"alpha": None, "agreement": float((_choices(library_int8, sequences) == exact).float().mean())}}
    candidates = {}
    for alpha in ALPHAS:
        candidates[alpha] = smoothed(alpha)
        agreement = float((_choices(candidates[alpha], sequences) == exact).float().mean())
        rows[f"int8 + smoothed int8 MLP, alpha {alpha}"] = {"alpha": alpha, "agreement": agreement}
    best = max((row for row in rows.values() if row["alpha"] is not None), key=lambda row: (row["agreement"], -row["alpha"]))
    batch_prompts = prompts[: 4 if quick else 8]
    rows[SHIPPED]["streams_differing"] = _batched_vs_single(library_int8, tokenizer, batch_prompts, tokens)
    best["streams_differing"] = _batched_vs_single(candidates[best["alpha"]], tokenizer, batch_prompts, tokens)
    best_label = next(label for label, row in rows.items() if row is best)
    speed = _decode_speed({SHIPPED: library_int8, best_label: candidates[best["alpha"]]}, tokenizer,
                          prompts[:3], 8 if quick else 128, repeats)
    for label, rate in speed.items():
        rows[label]["tok_s"] = rate
    print_table(f"int8 MLP candidate vs fp32 on {len(sequences)} validation prompts x {tokens} tokens ({name}); "
                f"batched vs single: {len(batch_prompts)} prompts",
                ["weights", "teacher-forced agreement", "streams differing, batched vs single", "tok/s, batch 1, eager"],
                [[label, f"{row['agreement']:.2%}", row.get("streams_differing", "-"),
                  fmt_spread(row["tok_s"], "{:.1f}") if "tok_s" in row else "-"] for label, row in rows.items()])
    return {"model": name, "prompts": len(sequences), "tokens": tokens, "steps": int(exact.numel()),
            "batch_prompts": len(batch_prompts), "calibration_records": len(calibration), "rows": rows,
            "best_alpha": best["alpha"], "target": 0.99}
