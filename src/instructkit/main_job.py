"""The main job (`instructkit run`, what `make run` calls): fine-tune the embedded default model,
answer the test split with the fine-tuned model and with the base model (k solved training
examples first, in the plain-text style the base model reads best; its answer is the first line
it writes: data/fewshot.py), evaluate,
write the report. The recipe lives here, so the CLI and the benchmarks use the same one.

The recipe, chosen for a CPU: the tied 262,144 x 640 token embedding stays frozen (63% of Gemma 3
270M's parameters, whose gradient and AdamW state would dominate memory and time), loss on the
response and end token only, length-grouped batches of 8, AdamW after 10 warm-up steps with cosine
decay, gradient clipping at 1.0, evaluation every 58 steps (half an epoch of the built-in or the
chapter's 935 training records) on the whole validation set. What differs by dataset is one
table, DataRecipe, each value chosen on that dataset's validation split: on the built-in data one
epoch of every other weight at a peak lr of 1e-4 and greedy test responses; on the chapter's (and
any other) data two epochs of LoRA (rank 16, alpha 32, every attention and MLP projection, peak
lr 5e-4) and beam search (4 beams, length penalty 1.0). Test responses end at the style's end
token, at twice the longest training response, or when they start repeating themselves
(response_budget, REPEAT_STOP). The validation responses scored at every evaluation stay greedy
(cheap; a trend).

The run folder belongs to one request: rerunning with the same settings continues it (a
finished training is kept, responses resume where they stopped), with other settings or other
data it is refused (runs.py and train/finetune.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.fewshot import BASE_MODEL_STYLE, DEFAULT_SHOTS
from instructkit.train.config import TrainConfig


@dataclass
class MainJob:
    model: str = "gemma-3-270m"
    data: str = "builtin"
    out: str = "runs/builtin"
    seed: int = 123
    epochs: int | None = None  # None: the data's recipe (data_recipe)
    lr: float | None = None  # None: the data's recipe
    lora_rank: int | None = None  # None: the data's recipe; 0: every weight but the tied embedding trains
    warmup: int = 10
    schedule: str = "cosine"
    max_steps: int | None = None
    max_new_tokens: int | None = None  # None: response_budget(the training split)
    beams: int | None = None  # None: the data's recipe
    length_penalty: float = 1.0
    base_max_new_tokens: int = 64
    base_shots: int = DEFAULT_SHOTS
    judge: object | None = field(default=None, repr=False)  # an evaluate.judge.JudgeConfig
    # Another system's responses to the same test entries (the book's gpt2-medium ones, say):
    # compared with ours in the report, with a paired bootstrap.
    baseline: str | None = None
    baseline_label: str | None = None

    @property
    def chosen(self) -> "DataRecipe":
        """The data's recipe with this job's explicit settings applied over it."""
        recipe = data_recipe(self.data)
        lora_rank = recipe.lora_rank if self.lora_rank is None else self.lora_rank
        return DataRecipe(epochs=self.epochs or recipe.epochs, beams=self.beams or recipe.beams, lora_rank=lora_rank,
                          lora_alpha=recipe.lora_alpha, lr=self.lr or peak_lr(lora_rank))

    def recipe(self) -> TrainConfig:
        chosen = self.chosen
        return main_recipe(self.model, self.data, self.out, seed=self.seed, epochs=chosen.epochs, lr=chosen.lr,
                           warmup=self.warmup, schedule=self.schedule, max_steps=self.max_steps,
                           lora_rank=chosen.lora_rank, lora_alpha=chosen.lora_alpha)


@dataclass(frozen=True)
class DataRecipe:
    """What the main job does differently on each dataset, every value chosen on that dataset's
    validation split (docs/BENCHMARKS.md, "The main job on the built-in data" and "Choosing the
    recipe")."""

    epochs: int
    beams: int  # 1: greedy test responses; more: beam search (beam.py), length penalty 1.0
    lora_rank: int = 0  # 0: every weight but the tied embedding trains
    lora_alpha: float = 16.0
    lr: float | None = None  # peak learning rate; None: peak_lr(lora_rank)

    def __post_init__(self):
        if self.lr is None:
            object.__setattr__(self, "lr", peak_lr(self.lora_rank))


def peak_lr(lora_rank: int) -> float:
    """The peak lr each way of training was chosen with (docs/BENCHMARKS.md): 1e-4 when every
    weight but the embedding trains (2e-4 and 5e-5 scored lower on validation responses), 5e-4 for
    LoRA adapters, whose updates start at zero and move a few million weights. A user who turns
    LoRA off with `--lora-rank 0` gets the full model's lr, not the adapters'."""
    return 1e-4 if lora_rank == 0 else 5e-4


# The built-in data: one epoch (a second barely lowered the validation loss for twice the time),
# greedy responses (its exact-answer checks were measured greedy), every weight but the embedding.
BUILTIN_RECIPE = DataRecipe(epochs=1, beams=1)
# The chapter's data, and any other: two epochs (`python -m bench recipes`: the best validation
# ROUGE-L, chrF and BLEU among 1 epoch, 2 epochs, 2 epochs at lr 2e-4), beam search with 4 beams
# (above greedy on every validation metric; 8 beams no better for twice the time), and LoRA
# (rank 16, alpha 32, on every attention and MLP projection, lr 5e-4): chosen over training every
# weight on the validation split pooled with a held-out fold of the training split (55 + 141
# items), with the lower validation loss too (0.82 against 1.24): LoRA leaves the base model's
# knowledge in place, and the full model at lr 1e-4 overfits 935 examples.
CHAPTER_RECIPE = DataRecipe(epochs=2, beams=4, lora_rank=16, lora_alpha=32.0)


def data_recipe(data: str) -> DataRecipe:
    return BUILTIN_RECIPE if data.split(":")[0] == "builtin" else CHAPTER_RECIPE


# Greedy decoding of a small model can fall into a loop and fill the budget with repeats, which
# the chapter's data showed on validation (the one-epoch candidate's responses took 3x as long to
# write as the two-epoch one's). A response ends when its last 16 tokens already appeared in it.
REPEAT_STOP = 16
RESPONSE_CAP = 256  # the chapter's max_new_tokens


def response_budget(train_records: list[dict], tokenizer) -> int:
    """New tokens allowed per response: twice the longest training response (no answer the model
    was taught is longer, so anything past it is a runaway), at most RESPONSE_CAP."""
    longest = max(len(tokenizer.encode(record["output"])) for record in train_records)
    return max(16, min(RESPONSE_CAP, 2 * longest))


# Evaluations (and checkpoints) every half epoch: 116 steps an epoch on both the built-in and the
# chapter's data. Each evaluation also writes 55 greedy validation responses (~15 s); every 40 steps
# (until 2026-11-30) made 7 of them in a chapter-data job instead of 5, ~40 s of a 15-minute budget.
# Evaluations do not change the training (no random draws), so the fine-tuned weights are the same.
EVAL_EVERY = 58


def main_recipe(model: str, data: str, out: str, *, seed: int = 123, epochs: int = 1, lr: float = 1e-4,
                warmup: int = 10, schedule: str = "cosine", max_steps: int | None = None, lora_rank: int = 0,
                lora_alpha: float = 16.0) -> TrainConfig:
    """The main job's fine-tuning recipe (see the module docstring)."""
    return TrainConfig(model=model, data=data, out=out, seed=seed, epochs=epochs, lr=lr, warmup=warmup,
                       schedule=schedule, clip=1.0, mask_instructions=True, freeze_embedding=True,
                       eval_every=EVAL_EVERY, eval_batches=7, max_steps=max_steps, save_every=EVAL_EVERY,
                       lora_rank=lora_rank, lora_alpha=lora_alpha)


def validation_scorer(records: list[dict], max_new_tokens: int | None = None, train_records: list[dict] | None = None):
    """Scores of greedy responses to the validation split, for every evaluation of the run
    (metrics.jsonl and the quality plot): ROUGE-L, chrF, BLEU, and exact-check accuracy where
    the records carry checks."""
    from instructkit.decode.generate import generate
    from instructkit.evaluate.checks import score_checks
    from instructkit.evaluate.metrics import summarize

    def score(model, tokenizer, style) -> dict:
        budget = max_new_tokens or response_budget(train_records, tokenizer)
        prompts = [tokenizer.encode(style.prompt(record)) for record in records]
        stops = style.stop_ids(tokenizer)
        texts = [r.text.strip() for r in generate(model, tokenizer, prompts, max_new_tokens=budget, stop_ids=stops,
                                                  repeat_stop=REPEAT_STOP)]
        summary, _ = summarize(texts, [record["output"] for record in records])
        scores = {"val_rouge_l": summary["rouge_l"], "val_chrf": summary["chrf"], "val_bleu": summary["bleu"]}
        checks = score_checks([{**record, "model_response": text} for record, text in zip(records, texts)])
        if checks is not None:
            scores["val_accuracy"] = checks["accuracy"]
        return scores

    return score


def run_main_job(job: MainJob, say=print) -> dict:
    """Every stage of the main job, resumable; returns the evaluation result."""
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import get_prompt_style
    from instructkit.decode.load import load_start
    from instructkit.evaluate.evaluation import evaluate_file
    from instructkit.models.registry import load_model
    from instructkit.respond import respond
    from instructkit.runs import RunFolder
    from instructkit.train.finetune import finetune

    started = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - started:.0f} s]"  # noqa: E731
    run = RunFolder(job.out)
    data = prepare_data(job.data)
    finetune(job.recipe(), resume=run.has_config(),  # refuses a folder made with other settings
             score_validation=validation_scorer(data.splits.val, job.max_new_tokens, data.splits.train))
    say(f"{stamp()} fine-tuning done")
    ready = load_start(str(run.path))
    tuned, style = ready.loaded, ready.style
    del ready
    budget = job.max_new_tokens or response_budget(data.splits.train, tuned.tokenizer)
    beams = job.chosen.beams
    respond(tuned, style, data.splits.test, run.responses_file("test"), max_new_tokens=budget, repeat_stop=REPEAT_STOP,
            beams=beams, length_penalty=job.length_penalty)
    del tuned
    say(f"{stamp()} fine-tuned responses written ({'greedy' if beams == 1 else f'{beams} beams'})")
    base = load_model(job.model)
    base_style = get_prompt_style(BASE_MODEL_STYLE) if job.base_shots else style
    respond(base, base_style, data.splits.test, run.responses_file(base=True), max_new_tokens=job.base_max_new_tokens,
            shots=job.base_shots, shot_pool=data.splits.train)
    del base
    say(f"{stamp()} base-model responses written ({job.base_shots}-shot, first line)")
    result = evaluate_file(run.responses_file("test"), out_dir=run.path, judge=job.judge,
                           baseline_path=run.responses_file(base=True),
                           baseline_label=f"base model, {job.base_shots}-shot", run_dir=run.path,
                           against_path=Path(job.baseline) if job.baseline else None, against_label=job.baseline_label)
    result["wall_seconds"] = time.perf_counter() - started
    return result
