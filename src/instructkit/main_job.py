"""The main job (`instructkit run`, what `make run` calls): fine-tune the embedded default model,
answer the test split with the fine-tuned model and with the base model (k solved training
examples first, in the plain-text style the base model reads best; its answer is the first line
it writes: data/fewshot.py), evaluate, write the report. The CLI and the benchmarks use the same job.

The recipes are files beside the package (src/instructkit/recipes/): builtin.yaml for the built-in
data and chapter.yaml for the chapter's (and any other), each value chosen on that dataset's
validation split and explained there. Both train on a CPU: the tied 262,144 x 640 token embedding
stays frozen, loss on the response and end token only, length-grouped batches of 8, AdamW after 10
warm-up steps with cosine decay, gradient clipping at 1.0, evaluation every 58 steps on the whole
validation set. On the built-in data three epochs of every other weight at a peak lr of 1e-4
and greedy test responses; on the chapter's two epochs of LoRA (rank 16, alpha 32, peak lr 5e-4) and
beam search (4 beams). A `--config` file goes over the data's recipe and flags over both
(MainJob.layers). Test responses end at the style's end token, at twice the longest training
response, or when they start repeating themselves (response_budget, REPEAT_STOP). The validation
responses scored at every evaluation stay greedy (cheap; a trend).

The run folder belongs to one request: rerunning with the same settings continues it (a
finished training is kept, responses resume where they stopped), with other settings or other
data it is refused (runs.py and train/finetune.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.fewshot import BASE_MODEL_STYLE, DEFAULT_SHOTS
from instructkit.errors import UserError
from instructkit.recipes import RESPONSES, read_recipe, shipped, typed_values
from instructkit.runs import default_run_dir
from instructkit.train.config import TrainConfig


@dataclass
class MainJob:
    # TrainConfig fields set on the command line: over the --config file, over the data's recipe.
    train: dict = field(default_factory=dict)
    config: str | None = None  # a recipe file (--config) over the data's own
    max_new_tokens: int | None = None  # None: response_budget(the training split)
    beams: int | None = None  # None: the recipe's (its `responses:` section)
    length_penalty: float = 1.0
    base_max_new_tokens: int = 64
    base_shots: int = DEFAULT_SHOTS
    judge: object | None = field(default=None, repr=False)  # an evaluate.judge.JudgeConfig
    # Another system's responses to the same test entries (the book's gpt2-medium ones, say):
    # compared with ours in the report, with a paired bootstrap.
    baseline: str | None = None
    baseline_label: str | None = None

    def layers(self) -> list[tuple[str, dict]]:
        """(where, settings), later over earlier: the data's shipped recipe, --config, the command line."""
        given = read_recipe(self.config) if self.config else {}
        data = self.train.get("data") or given.get("data") or "builtin"
        shipped_file = shipped(data_recipe(str(data)))
        layers = [(str(shipped_file), read_recipe(shipped_file)), (str(self.config), given),
                  ("the command line", {**self.train, "data": data})]
        return layers if self.config else [layers[0], layers[2]]

    def recipe(self) -> TrainConfig:
        """The fine-tuning config: the layers' settings, validated. A LoRA rank set without a peak
        lr takes peak_lr(rank); a run without an --out is named after its data."""
        values, chosen = {}, {}
        for index, (where, settings) in enumerate(self.layers()):
            typed = typed_values(TrainConfig, settings, where, skip=(RESPONSES,))
            values.update(typed)
            if index:  # what the user chose, over the shipped recipe
                chosen.update(typed)
        if "lora_rank" in chosen and "lr" not in chosen:
            values["lr"] = peak_lr(values["lora_rank"])
        values.setdefault("out", default_run_dir(values["data"], model=values.get("model")))
        return TrainConfig.from_dict(values).validate()

    def chosen_beams(self) -> int:
        """Beams for the test responses: --beams, else the last `responses:` section's."""
        beams = None
        for where, settings in self.layers():
            section = settings.get(RESPONSES, {})
            if not isinstance(section, dict) or set(section) - {"beams"}:
                raise UserError(f"{where}: {RESPONSES}: expected a mapping with the key beams, got {section!r}")
            beams = section.get("beams", beams)
        return self.beams or beams or 1

    def validate(self) -> "MainJob":
        for name in ("max_new_tokens", "beams", "base_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.base_shots < 0:
            raise UserError(f"--base-shots must be 0 or more, got {self.base_shots}")
        if self.baseline and not Path(self.baseline).is_file():
            raise UserError(f"--baseline {self.baseline}: no such responses file")
        self.recipe()
        self.chosen_beams()
        return self


def peak_lr(lora_rank: int) -> float:
    """The peak lr each way of training was chosen with (docs/BENCHMARKS.md): 1e-4 when every
    weight but the embedding trains (2e-4 and 5e-5 scored lower on validation responses), 5e-4 for
    LoRA adapters, whose updates start at zero and move a few million weights. A user who turns
    LoRA off with `--lora-rank 0` gets the full model's lr, not the adapters'."""
    return 1e-4 if lora_rank == 0 else 5e-4


def data_recipe(data: str) -> str:
    """The shipped recipe a dataset takes: builtin on the built-in data, chapter on any other."""
    return "builtin" if data.split(":")[0] == "builtin" else "chapter"


# Greedy decoding of a small model can fall into a loop and fill the budget with repeats, which
# the chapter's data showed on validation (the one-epoch candidate's responses took 3x as long to
# write as the two-epoch one's). A response ends when its last 16 tokens already appeared in it.
REPEAT_STOP = 16
RESPONSE_CAP = 256  # the chapter's max_new_tokens


def response_budget(train_records: list[dict], tokenizer) -> int:
    """New tokens allowed per response: twice the longest training response (a conversation's
    longest answer; no answer the model was taught is longer, so anything past it is a runaway),
    at most RESPONSE_CAP."""
    from instructkit.data.conversations import scored_entries

    longest = max(len(tokenizer.encode(entry["output"])) for record in train_records for entry in scored_entries(record))
    return max(16, min(RESPONSE_CAP, 2 * longest))


# Evaluations (and checkpoints) every half epoch, as the shipped recipes say (bench/ reads it here).
EVAL_EVERY = read_recipe(shipped("builtin"))["eval_every"]


def validation_scorer(records: list[dict], max_new_tokens: int | None = None, train_records: list[dict] | None = None):
    """Scores of greedy responses to the validation split, for every evaluation of the run
    (metrics.jsonl and the quality plot): ROUGE-L, chrF, BLEU, and exact-check accuracy where
    the records carry checks."""
    from instructkit.data.conversations import scored_entries
    from instructkit.decode.generate import generate
    from instructkit.evaluate.checks import score_checks
    from instructkit.evaluate.metrics import summarize

    entries = [entry for record in records for entry in scored_entries(record)]  # conversations: every turn

    def score(model, tokenizer, style) -> dict:
        budget = max_new_tokens or response_budget(train_records, tokenizer)
        prompts = [style.prompt_ids(record, tokenizer) for record in entries]
        stops = style.stop_ids(tokenizer)
        texts = [r.text.strip() for r in generate(model, tokenizer, prompts, max_new_tokens=budget, stop_ids=stops,
                                                  repeat_stop=REPEAT_STOP)]
        summary, _ = summarize(texts, [record["output"] for record in entries])
        scores = {"val_rouge_l": summary["rouge_l"], "val_chrf": summary["chrf"], "val_bleu": summary["bleu"]}
        checks = score_checks([{**record, "model_response": text} for record, text in zip(entries, texts)])
        if checks is not None:
            scores["val_accuracy"] = checks["accuracy"]
        return scores

    return score


def run_main_job(job: MainJob, say=print) -> dict:
    """Every stage of the main job, resumable; returns the evaluation result."""
    from instructkit.data.pipeline import prepare_data
    from instructkit.decode.load import load_start
    from instructkit.evaluate.evaluation import evaluate_file
    from instructkit.respond import respond
    from instructkit.runs import RunFolder
    from instructkit.train.finetune import finetune

    started = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - started:.0f} s]"  # noqa: E731
    config, beams = job.recipe(), job.chosen_beams()
    run = RunFolder(config.out)
    # The split finetune makes: the same records stay held out.
    data = prepare_data(config.data, skip_invalid=config.skip_invalid, shuffle_seed=config.shuffle_seed,
                        group_near_duplicates=config.group_near_duplicates, fmt=config.format, columns=config.columns)
    finetune(config, resume=run.has_config(),  # refuses a folder made with other settings
             score_validation=validation_scorer(data.splits.val, job.max_new_tokens, data.splits.train))
    say(f"{stamp()} fine-tuning done")
    ready = load_start(str(run.path))
    tuned, style = ready.loaded, ready.style
    del ready
    budget = job.max_new_tokens or response_budget(data.splits.train, tuned.tokenizer)
    respond(tuned, style, data.splits.test, run.responses_file("test"), max_new_tokens=budget, repeat_stop=REPEAT_STOP,
            beams=beams, length_penalty=job.length_penalty)
    del tuned
    say(f"{stamp()} fine-tuned responses written ({'greedy' if beams == 1 else f'{beams} beams'})")
    # The base model answers k-shot in the plain style it reads best, else in the run's style;
    # conversations zero-shot in the run's style (few-shot prompts are made of Alpaca records).
    shots = job.base_shots if data.loaded.format == "alpaca" else 0
    base_ready = load_start(config.model, prompt_style=BASE_MODEL_STYLE if shots else style.name)
    base, base_style = base_ready.loaded, base_ready.style
    del base_ready
    respond(base, base_style, data.splits.test, run.responses_file(base=True), max_new_tokens=job.base_max_new_tokens,
            shots=shots, shot_pool=data.splits.train)
    del base
    say(f"{stamp()} base-model responses written ({shots}-shot, first line)")
    result = evaluate_file(run.responses_file("test"), out_dir=run.path, judge=job.judge,
                           baseline_path=run.responses_file(base=True),
                           baseline_label=f"base model, {shots}-shot", run_dir=run.path,
                           against_path=Path(job.baseline) if job.baseline else None, against_label=job.baseline_label)
    result["wall_seconds"] = time.perf_counter() - started
    return result
