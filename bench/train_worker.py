"""One training-throughput measurement, in its own process: `python -m bench.train_worker SPEC_JSON`.

impl "ours": instructkit's loop (length-grouped batches, head only at supervised positions);
switches turn each speed feature off for the ablation. impl "naive": the chapter's loop
(its shuffled order, pad to the batch maximum, full logits, plain cross-entropy, evaluation on
5 + 5 batches with full logits). impl "hf_trl": HF transformers' model trained by TRL's
SFTTrainer on the same weights, data, batch and steps.

FLOP count (model FLOPs, for MFU): a linear layer with P weights applied to n rows costs 2Pn
forward; backward costs 2Pn for the input gradient and 2Pn for the weight gradient (only when
the weight trains). Attention scores cost 2 * 2 * L * (H * D) * sum_rows(T^2) / 2 forward
(causal half) and twice that backward. The head is a linear layer applied to the positions
where it runs (all for the naive loop, supervised ones for ours).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _setup(spec: dict):
    import torch

    from instructkit.data.pipeline import encode_splits, prepare_data
    from instructkit.data.prompts import resolve_prompt_style
    from instructkit.models.registry import load_model

    torch.manual_seed(0)
    from instructkit.train.quantized_base import frozen_linears

    # As `instructkit finetune` loads: a quantized base, each layer quantized as it is read
    loaded = load_model(spec["model"], seed=0, frozen=frozen_linears(spec.get("base_quantize", "none")))
    style = resolve_prompt_style(spec.get("prompt_style") or loaded.default_prompt_style, loaded)
    data = prepare_data(spec["data"])
    encoded = encode_splits(data, style, loaded.tokenizer, mask_instructions=spec.get("mask_instructions", False))
    return loaded, style, encoded["train"][0], encoded["val"][0]


def _linear_params(model) -> tuple[int, int]:
    """(body linear weights, head weights); a quantized base's frozen layers count as the products
    they stand for (their arithmetic is int8 or dequantized fp32, so MFU against the fp32 peak is
    only a rough guide there)."""
    import torch

    from instructkit.train.quantized_base import FrozenBaseLinear

    body = sum(m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, FrozenBaseLinear)) and name != "lm_head" and not name.endswith("lm_head"))
    return body, model.lm_head.weight.numel()


def _step_flops(model, inputs_lengths: list[int], padded_width: int, head_positions: int, *,
                body_trains: bool, head_trains: bool, padded: bool) -> float:
    c = model.config
    body, head = _linear_params(model)
    rows = len(inputs_lengths)
    tokens = rows * padded_width if padded else sum(inputs_lengths)
    heads_dim = c.n_heads * c.head_dim
    attention = 2 * c.n_layers * heads_dim * sum((padded_width if padded else t) ** 2 for t in inputs_lengths)
    forward = 2 * body * tokens + 2 * head * head_positions + attention
    backward = (2 * body * tokens) * (2 if body_trains else 1) + (2 * head * head_positions) * (2 if head_trains else 1) + 2 * attention
    return forward + backward


def run_ours(spec: dict) -> dict:
    import torch

    from instructkit.data.tokenize import IGNORE_INDEX
    from instructkit.train.config import TrainConfig
    from instructkit.train.lora import apply_lora
    from instructkit.train.loop import build_optimizer, epoch_batches, eval_batches, evaluate_loss, train_step

    loaded, _, train, val = _setup(spec)
    model, pad = loaded.model, loaded.tokenizer.pad_id
    config = TrainConfig(batch_size=spec["batch"], batching=spec.get("batching", "grouped"), seed=123)
    if spec.get("lora_rank"):
        from instructkit.train.quantized_base import quantize_base

        apply_lora(model, ["attention", "mlp"], spec["lora_rank"], 16.0)
        quantize_base(model, spec.get("base_quantize", "none"))  # --base-quantize: the frozen base held int8/int4
    if spec.get("freeze_embedding"):
        model.lm_head.weight.requires_grad_(False)
    model.checkpoint_layers = bool(spec.get("checkpoint"))
    packing = dict(packing=bool(spec.get("packing")), pack_length=spec.get("pack_length"))
    device, precision = torch.device(spec.get("device", "cpu")), spec.get("precision", "fp32")
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, config)
    batches = epoch_batches(train, config, 0)
    full_head = spec.get("head") == "full"
    if full_head:  # ablation: the head at every position, as HF and the chapter do
        import instructkit.train.loop as loop

        def full_logits_loss(model, inputs, targets):
            logits = model(inputs)
            supervised = targets != IGNORE_INDEX
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                                     ignore_index=IGNORE_INDEX), int(supervised.sum())

        loop.supervised_loss_sum = full_logits_loss
    count = spec.get("eval_batches", 5)
    train_eval, val_eval = eval_batches(train, spec["batch"], count), eval_batches(val, spec["batch"], count)
    return _measure(spec, model, batches, train, pad,
                    step=lambda batch: train_step(model, optimizer, train, [batch], pad_id=pad, lr=5e-5, clip=None,
                                                  device=device, precision=precision, **packing),
                    evaluate=lambda: (evaluate_loss(model, train, train_eval, pad, device=device, precision=precision),
                                      evaluate_loss(model, val, val_eval, pad, device=device, precision=precision)),
                    head_everywhere=full_head,
                    body_trains=not spec.get("lora_rank"), head_trains=not (spec.get("lora_rank") or spec.get("freeze_embedding")))


def run_naive(spec: dict) -> dict:
    """The chapter's train_model_simple / calc_loss_batch / evaluate_model, on our GPT-2."""
    import torch
    import torch.nn.functional as F

    from instructkit.data.batching import batches_in_order, chapter_shuffle_order, collate

    loaded, _, train, val = _setup(spec)
    model, pad = loaded.model, loaded.tokenizer.pad_id
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    batches = batches_in_order(chapter_shuffle_order(len(train), 123), spec["batch"], drop_last=True)
    val_batches = batches_in_order(range(len(val)), spec["batch"], drop_last=False)

    def calc_loss_batch(examples, batch):
        inputs, targets = collate([examples[i] for i in batch], pad_id=pad)
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def step(batch):
        optimizer.zero_grad()
        loss = calc_loss_batch(train, batch)
        loss.backward()
        optimizer.step()

    # The chapter evaluates on 5 batches of a freshly shuffled training loader; the first 5 batches
    # in file order here, the examples our loop evaluates on, so both sides do the same work.
    train_eval_batches = batches_in_order(range(len(train)), spec["batch"], drop_last=False)

    def evaluate():
        model.eval()
        with torch.no_grad():
            train_loss = sum(calc_loss_batch(train, b).item() for b in train_eval_batches[:5]) / 5
            val_loss = sum(calc_loss_batch(val, b).item() for b in val_batches[:5]) / 5
        model.train()
        return train_loss, val_loss

    return _measure(spec, model, batches, train, pad, step=step, evaluate=evaluate, head_everywhere=True,
                    body_trains=True, head_trains=True)


def _measure(spec, model, batches, train, pad, *, step, evaluate, head_everywhere, body_trains, head_trains) -> dict:
    """Time `steps` training steps after `warmup`, then one evaluation, charged to the run as
    steps / eval_every evaluations (what a whole run on this schedule spends)."""
    from instructkit.data.batching import collate, pack
    from instructkit.data.tokenize import IGNORE_INDEX

    warmup, steps, eval_every = spec.get("warmup", 1), spec["steps"], spec.get("eval_every", 0)
    from bench.common import peak_rss_bytes, reset_peak_rss

    setup_peak = peak_rss_bytes()  # loading (and quantizing) the model
    reset_peak_rss()  # from here: training's own peak
    for batch in batches[:warmup]:
        step(batch)
    step_seconds, real, padded, supervised, flops = [], 0, 0, 0, 0.0
    import torch

    cuda = torch.cuda.is_available() and spec.get("device") == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for batch in batches[warmup : warmup + steps]:
        if spec.get("packing"):  # the rows the step computes (attention counted per example: FLOPs are model FLOPs)
            inputs, targets, _ = pack([train[i] for i in batch], pad_id=pad, row_length=spec.get("pack_length"))
        else:
            inputs, targets = collate([train[i] for i in batch], pad_id=pad)
        lengths = [len(train[i]) - 1 for i in batch]
        n_supervised = int((targets != IGNORE_INDEX).sum())
        head_positions = inputs.numel() if head_everywhere else n_supervised
        flops += _step_flops(model, lengths, inputs.shape[1], head_positions, body_trains=body_trains,
                             head_trains=head_trains, padded=not spec.get("packing"))
        start = time.perf_counter()
        step(batch)
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        real, padded, supervised = real + sum(lengths), padded + inputs.numel(), supervised + n_supervised
    one_eval = 0.0
    if eval_every:
        start = time.perf_counter()
        evaluate()
        one_eval = time.perf_counter() - start
    eval_seconds = one_eval * steps / eval_every if eval_every else 0.0
    train_time = sum(step_seconds)
    return {**spec, "step_seconds": step_seconds, "one_eval_seconds": one_eval, "eval_seconds": eval_seconds,
            "real_tokens": real, "padded_tokens": padded, "supervised_tokens": supervised,
            "real_tok_s": real / train_time, "padded_tok_s": padded / train_time, "supervised_tok_s": supervised / train_time,
            "run_real_tok_s": real / (train_time + eval_seconds), "eval_share": eval_seconds / (train_time + eval_seconds),
            "model_gflops": flops / train_time / 1e9, "peak_rss_gb": max(setup_peak, peak_rss_bytes()) / 1e9,
            "setup_peak_rss_gb": setup_peak / 1e9, "train_peak_rss_gb": peak_rss_bytes() / 1e9,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **({"cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9, "gpu": torch.cuda.get_device_name()} if cuda else {})}


def run_hf_trl(spec: dict) -> dict:
    """HF transformers' model of the same family with our weights, trained by TRL's SFTTrainer
    (with PEFT's LoRA when the spec has `lora_rank`).

    The peer loads a Hugging Face folder as given, else our own HF export of the model
    (export/hf.py: config.json, safetensors, tokenizer), with AutoModelForCausalLM, so every family
    works the same way and both sides start from the same weights. Same work as ours where the spec says so: the same trainable parameters
    (`freeze_embedding` freezes the tied embedding, so the optimizer skips it, as ours does; LoRA
    wraps the same seven projections at the same rank and alpha), the same supervision
    (completion-only loss), batch and data; gradient checkpointing as the spec says (TRL's
    SFTConfig turns it on by default, which recomputes the forward pass). Real tokens are counted
    from the batches the trainer actually ran (attention-mask sums, minus one per row: the
    positions that predict a next token, as ours counts)."""
    import tempfile

    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import resolve_prompt_style
    from instructkit.export.hf import write_hf
    from instructkit.models.registry import load_model

    if (Path(spec["model"]) / "config.json").exists() and spec.get("prompt_style"):
        # A Hugging Face folder: read as transformers reads it (ours never loaded beside it)
        style = resolve_prompt_style(spec["prompt_style"], None)
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    else:
        loaded = load_model(spec["model"], seed=0)
        style = resolve_prompt_style(spec.get("prompt_style") or loaded.default_prompt_style, loaded)
        with tempfile.TemporaryDirectory() as folder:
            write_hf(loaded, style, Path(folder))
            del loaded
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.get("freeze_embedding"):
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the head is frozen with it
    peft_config = None
    if spec.get("lora_rank"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=16.0, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                                 "qkv_proj", "gate_up_proj"])
    records = prepare_data(spec["data"]).splits.train
    dataset = Dataset.from_list([{"prompt": style.prompt(r), "completion": r["output"]} for r in records])
    steps, warmup = spec["steps"], spec.get("warmup", 1)
    times: list[float] = []
    step_tokens: list[int] = []
    current = {"tokens": 0}

    def count_tokens(module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            current["tokens"] += int(mask.sum()) - mask.shape[0] if mask is not None else ids.numel() - ids.shape[0]

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    from bench.common import peak_rss_bytes, reset_peak_rss

    peaks = {}

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            peaks["setup"] = peak_rss_bytes()
            reset_peak_rss()

        def on_step_begin(self, args, state, control, **kwargs):
            current["tokens"] = 0
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            step_tokens.append(current["tokens"])

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=warmup + steps,
                         learning_rate=5e-5, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True,
                         bf16=False, fp16=False, logging_steps=1000, eval_strategy="no", dataloader_num_workers=0,
                         completion_only_loss=spec.get("mask_instructions", True), packing=False, seed=123,
                         max_length=None, gradient_checkpointing=spec.get("gradient_checkpointing", False))
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()], peft_config=peft_config)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    from bench.common import versions

    measured, real = times[warmup:], sum(step_tokens[warmup:])
    return {**spec, "step_seconds": measured, "real_tok_s": real / sum(measured), "real_tokens": real,
            "run_real_tok_s": real / sum(measured), "peak_rss_gb": max(peaks["setup"], peak_rss_bytes()) / 1e9,
            "setup_peak_rss_gb": peaks["setup"] / 1e9, "train_peak_rss_gb": peak_rss_bytes() / 1e9,
            "trainable_parameters": trainable, "versions": versions()}


def main() -> None:
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    runner = {"ours": run_ours, "naive": run_naive, "hf_trl": run_hf_trl}[spec["impl"]]
    print(json.dumps(runner(spec)))


if __name__ == "__main__":
    main()
