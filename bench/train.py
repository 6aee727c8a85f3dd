"""Training throughput: ours, the chapter's loop, HF + TRL, and what each recipe change buys.

Each configuration runs in its own process (peak RSS is its own); rounds are interleaved (every
configuration once per round), so drift on a shared machine hits every configuration alike, and
each ratio is taken within a round, then reported as the median over rounds with min-max.

A ratio against a peer counts as "met" only when both sides do the same work: the same model,
data, batch, supervised tokens, trainable parameters and evaluation schedule. Rows where our
recipe does less work (loss on responses only, frozen embedding, sparser evaluation) are shown
with what each change buys, never as a met target.
"""

from __future__ import annotations

from bench import peak
from bench.common import DATA, fmt_spread, print_table, run_worker, spread

QUICK_ROWS = ("gpt2: the chapter's loop", "gpt2: ours, chapter recipe", "gemma: ours, LoRA r16",
              "gemma: HF + TRL + PEFT, LoRA r16")
TARGET = 2.0  # the brief: >= 2x HF + TRL/PEFT on the same trainable parameters


def configurations(quick: bool) -> list[tuple[str, dict]]:
    gpt2 = "tiny-gpt2" if quick else "random:gpt2-small"
    gemma = "tiny-gemma3" if quick else "gemma-3-270m"
    smol = "smollm2-135m-instruct"
    base = {"data": DATA, "batch": 8, "steps": 3 if quick else 8, "warmup": 1}
    # The chapter's recipe: every token supervised, evaluation every 5 steps on 5 + 5 batches.
    chapter = {**base, "eval_every": 5, "eval_batches": 5}
    gemma_base = {**base, "steps": 3 if quick else 6, "eval_every": 0, "mask_instructions": True}
    rows = [
        ("gpt2: the chapter's loop", {**chapter, "impl": "naive", "model": gpt2}),
        ("gpt2: ours, chapter recipe", {**chapter, "impl": "ours", "model": gpt2}),
        ("gpt2: ours, chapter recipe, chapter batching", {**chapter, "impl": "ours", "model": gpt2, "batching": "chapter"}),
        ("gpt2: ours, chapter recipe, head everywhere", {**chapter, "impl": "ours", "model": gpt2, "head": "full"}),
        ("gpt2: ours, + loss on responses only", {**chapter, "impl": "ours", "model": gpt2, "mask_instructions": True}),
        # What `instructkit run` does: loss on responses, tied embedding frozen, evaluation every
        # 58 steps on the whole validation set (55 examples = 7 batches).
        ("gpt2: ours, run recipe", {**chapter, "impl": "ours", "model": gpt2, "mask_instructions": True,
                                    "freeze_embedding": True, "eval_every": 58, "eval_batches": 7}),
        ("gemma: ours, frozen embedding", {**gemma_base, "impl": "ours", "model": gemma, "freeze_embedding": True}),
        ("gemma: HF + TRL, frozen embedding", {**gemma_base, "impl": "hf_trl", "model": gemma, "freeze_embedding": True}),
        ("gemma: ours, full", {**gemma_base, "impl": "ours", "model": gemma}),
        ("gemma: HF + TRL, full", {**gemma_base, "impl": "hf_trl", "model": gemma}),
        ("gemma: HF + TRL, full, TRL defaults (gradient checkpointing)",
         {**gemma_base, "impl": "hf_trl", "model": gemma, "gradient_checkpointing": True}),
        ("gemma: ours, LoRA r16", {**gemma_base, "impl": "ours", "model": gemma, "lora_rank": 16}),
        # A llama-family model (SmolLM2-135M-Instruct, real weights): the same comparisons, with
        # PEFT's LoRA on the same seven projections beside ours.
        ("smollm2: ours, full", {**gemma_base, "impl": "ours", "model": smol}),
        ("smollm2: HF + TRL, full", {**gemma_base, "impl": "hf_trl", "model": smol}),
        ("smollm2: ours, LoRA r16", {**gemma_base, "impl": "ours", "model": smol, "lora_rank": 16}),
        ("smollm2: HF + TRL + PEFT, LoRA r16", {**gemma_base, "impl": "hf_trl", "model": smol, "lora_rank": 16}),
        # Another recipe, its own row: the same adapters on an int8 base (integer products).
        ("smollm2: ours, LoRA r16, int8 base", {**gemma_base, "impl": "ours", "model": smol, "lora_rank": 16,
                                                "base_quantize": "int8"}),
        ("gemma: HF + TRL + PEFT, LoRA r16", {**gemma_base, "impl": "hf_trl", "model": gemma, "lora_rank": 16}),
        ("gemma: ours, frozen embedding, head everywhere",
         {**gemma_base, "impl": "ours", "model": gemma, "freeze_embedding": True, "head": "full"}),
    ]
    # Layouts of the same examples (issue 37): length-grouped, the chapter's shuffled order, each
    # packed (rows as long as the micro-batch's longest example, or a fixed length), and layers
    # checkpointed; on the chapter's data (Gemma 3 270M, full) and on a conversation file
    # (SmolLM2-135M-Instruct, its ChatML template, LoRA r16). `--only layout` runs these alone.
    chat = {**gemma_base, "impl": "ours", "model": smol, "data": "builtin-chat", "lora_rank": 16}
    layouts = [
        ("layout gemma: grouped", {**gemma_base, "impl": "ours", "model": gemma}),
        ("layout gemma: grouped, packed 512", {**gemma_base, "impl": "ours", "model": gemma, "packing": True, "pack_length": 512}),
        ("layout gemma: chapter batching", {**gemma_base, "impl": "ours", "model": gemma, "batching": "chapter"}),
        ("layout gemma: chapter batching, packed", {**gemma_base, "impl": "ours", "model": gemma, "batching": "chapter",
                                                    "packing": True}),
        ("layout gemma: chapter batching, packed 512", {**gemma_base, "impl": "ours", "model": gemma, "batching": "chapter",
                                                        "packing": True, "pack_length": 512}),
        ("layout gemma: grouped, checkpointed", {**gemma_base, "impl": "ours", "model": gemma, "checkpoint": True}),
        ("layout smollm2 chat: grouped", chat),
        ("layout smollm2 chat: chapter batching", {**chat, "batching": "chapter"}),
        ("layout smollm2 chat: chapter batching, packed", {**chat, "batching": "chapter", "packing": True}),
        ("layout smollm2 chat: chapter batching, packed 1024", {**chat, "batching": "chapter", "packing": True,
                                                                "pack_length": 1024}),
        ("layout smollm2 chat: grouped, checkpointed", {**chat, "checkpoint": True}),
    ]
    rows += [(name, spec) for name, spec in layouts]
    if quick:  # the harness, each worker kind once (the chapter's loop, ours, HF + TRL, LoRA both sides)
        return [(name, spec) for name, spec in rows if name in QUICK_ROWS]
    return rows


# (ours, peer, what is compared, measure, same work?)
COMPARISONS = [
    ("gpt2: ours, chapter recipe", "gpt2: the chapter's loop", "gpt2-small, the chapter's recipe, incl. its evaluation",
     "run_real_tok_s", True),
    ("gpt2: ours, chapter recipe", "gpt2: the chapter's loop", "gpt2-small, the chapter's recipe, training steps only",
     "real_tok_s", True),
    ("gemma: ours, frozen embedding", "gemma: HF + TRL, frozen embedding",
     "Gemma 3 270M, all but the tied embedding trains", "real_tok_s", True),
    ("gemma: ours, full", "gemma: HF + TRL, full", "Gemma 3 270M, full fine-tuning", "real_tok_s", True),
    ("gemma: ours, LoRA r16", "gemma: HF + TRL + PEFT, LoRA r16", "Gemma 3 270M, LoRA r16 on the 7 projections",
     "real_tok_s", True),
    ("smollm2: ours, full", "smollm2: HF + TRL, full", "SmolLM2-135M-Instruct, full fine-tuning", "real_tok_s", True),
    ("smollm2: ours, LoRA r16", "smollm2: HF + TRL + PEFT, LoRA r16", "SmolLM2-135M-Instruct, LoRA r16 on the 7 projections",
     "real_tok_s", True),
    ("smollm2: ours, LoRA r16, int8 base", "smollm2: HF + TRL + PEFT, LoRA r16",
     "SmolLM2-135M-Instruct, LoRA r16; ours on an int8 base (integer products), PEFT on fp32", "real_tok_s", False),
    ("gemma: ours, full", "gemma: HF + TRL, full, TRL defaults (gradient checkpointing)",
     "Gemma 3 270M, full; TRL recomputes its forward pass (its default)", "real_tok_s", False),
    ("gpt2: ours, chapter recipe, chapter batching", "gpt2: the chapter's loop",
     "ablation: ours without length grouping (padding 19%)", "real_tok_s", False),
    ("gpt2: ours, chapter recipe, head everywhere", "gpt2: the chapter's loop",
     "ablation: ours with the head at every position", "real_tok_s", False),
    ("gpt2: ours, + loss on responses only", "gpt2: the chapter's loop",
     "recipe: loss on responses only (the head runs on fewer positions)", "run_real_tok_s", False),
    ("gpt2: ours, run recipe", "gpt2: the chapter's loop",
     "recipe: + frozen embedding + evaluation every 58 steps (the main job)", "run_real_tok_s", False),
]


def run(quick: bool = False, peak_gflops: float | None = None, repeats: int | None = None, only: str | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    configs = configurations(quick)
    if only:  # --only: configurations whose name holds one of the words
        configs = [(name, spec) for name, spec in configs if any(word in name for word in only.split(","))]
    raw: dict[str, list[dict]] = {name: [] for name, _ in configs}
    peaks = [peak_gflops] if peak_gflops else []
    for _ in range(repeats):  # interleaved: every configuration once per round
        for name, spec in configs:
            raw[name].append(run_worker("bench.train_worker", spec))
        if peak_gflops:  # the peak again, so MFU is against the best rate of this run
            peaks.append(peak.summarize(peak.sample(quick))["gflops"])
    peak_gflops = max(peaks) if peaks else None
    if peak_gflops:
        print(f"fp32 matmul peak, best of {len(peaks)} samplings in this run: {peak_gflops:.1f} GFLOP/s")

    def values(name: str, key: str) -> list[float]:
        return [r.get(key, float("nan")) if "error" not in r else float("nan") for r in raw[name]]

    rows, summary = [], {}
    for name, _ in configs:
        runs = [r for r in raw[name] if "error" not in r]
        if not runs:
            rows.append([name, "failed: " + raw[name][0]["error"][:60]] + [""] * 6)
            continue
        mfu = [g / peak_gflops for g in values(name, "model_gflops")] if peak_gflops else []
        summary[name] = {key: spread(values(name, key)) for key in
                         ("real_tok_s", "run_real_tok_s", "supervised_tok_s", "eval_share", "peak_rss_gb")}
        summary[name]["mfu"] = spread(mfu)
        # The examples of every round are the same: the share of computed positions that are padding
        # (the peer's workers count real tokens only).
        padded = runs[0].get("padded_tokens")
        summary[name]["padding_share"] = 1 - runs[0]["real_tokens"] / padded if padded else float("nan")
        rows.append([name, fmt_spread(summary[name]["real_tok_s"], "{:.1f}"), fmt_spread(summary[name]["run_real_tok_s"], "{:.1f}"),
                     fmt_spread(summary[name]["eval_share"], "{:.0%}"), fmt_spread(summary[name]["mfu"], "{:.0%}"),
                     f"{summary[name]['padding_share']:.1%}", f"{max(r['peak_rss_gb'] for r in runs):.2f}"])
    print_table("Training throughput, median (min-max) of interleaved rounds",
                ["configuration", "real tok/s", "incl. eval", "eval share", "MFU", "padding", "peak RSS GB"], rows)
    ratios = []
    for ours, peer, what, key, same_work in COMPARISONS:
        if ours not in summary or peer not in summary:
            continue
        per_round = [a / b for a, b in zip(values(ours, key), values(peer, key))]
        ratio = spread(per_round)
        met = ("yes" if ratio["median"] >= TARGET else "no") if same_work else "- (not the same work)"
        ratios.append({"ours": ours, "peer": peer, "what": what, "measure": key, "same_work": same_work,
                       "ratio": ratio, "met": met})
    print_table(f"Ratios (per round, median and min-max over {repeats}); target {TARGET}x on the same work",
                ["comparison", "ratio", "met"], [[r["what"], fmt_spread(r["ratio"], "{:.2f}", "x"), r["met"]] for r in ratios])
    return {"summary": summary, "ratios": ratios, "raw": raw, "peak_gflops": peak_gflops, "peak_samplings": peaks,
            "repeats": repeats}
