"""Every command on every family (issue 35), on tiny random checkpoints that transformers itself
makes and saves (test_family_parity.make_checkpoint: each family's own switches on, wide weights,
GPT-2's tokenizer; its parity tests cover the HF export of each).

In this process, on all eight families: full and LoRA training (LoRA on the family's targets)
save a model folder that reloads to exactly the trained weights, an untied head included; int8
and int4 decoding equal an fp32 model holding the weights each quantized layer stands for
(biases, untied heads and soft-capping included), and the static decode step (what --compile
compiles) gives the engine's tokens; DPO's log-probs come through each family's own head. One
compiled step (inductor, as --compile runs it) carries every switch at once.

As a user types them, on the families whose switches differ most: `run` on Phi-3 (fused weights,
longrope, an untied head; the recipe's frozen embedding) then `export` and `serve --compare-base`
(the base model an HF folder); `finetune` LoRA -> `respond --quantize int8` -> `evaluate` -> `dpo`
on Gemma 2 (soft-capped scores and logits); `run` LoRA on OLMo 2 (post-norms) then `chat`; and
`finetune --nproc 2` (FSDP) on Llama against one process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from instructkit.data.tokenize import IGNORE_INDEX
from instructkit.decode import static_decode
from instructkit.decode.generate import generate
from instructkit.decode.load import load_for_talk
from instructkit.decode.quantize import Int8GroupLinear, ShortlistHead, quantize_model
from instructkit.models.registry import load_model
from instructkit.models.transformer import Transformer
from instructkit.serve.conversation import encode_conversation
from instructkit.train import distributed
from instructkit.train.config import TrainConfig
from instructkit.train.dpo import dpo_loss, sequence_logprobs
from instructkit.train.finetune import finetune

from .conftest import require_module, run_cli
from .test_family_parity import FAMILIES, make_checkpoint

transformers = require_module("transformers")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNTIED = {"llama", "mistral", "phi3", "olmo2"}  # as make_checkpoint saves them


# Fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        folders[family].mkdir()
        reference = make_checkpoint(family, folders[family])
        biases = [parameter for name, parameter in reference.named_parameters() if name.endswith(".bias")]
        if biases:  # transformers starts Qwen 2's q/k/v biases at zero: make them matter too
            with torch.no_grad():
                for bias in biases:
                    bias.normal_(0.0, 0.3)
            reference.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def small_data(chapter_data_path, tmp_path_factory):
    """40 of the chapter's records: 34 train, 4 test, 2 validation."""
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(json.loads(chapter_data_path.read_text())[:40]))
    return path


@pytest.fixture(scope="module")
def small_preferences(shared_data, tmp_path_factory):
    records = [r for r in json.loads((shared_data / "instruction-data-with-preference.json").read_text())
               if r["chosen"] != r["rejected"]][:24]
    path = tmp_path_factory.mktemp("data") / "preferences.json"
    path.write_text(json.dumps(records))
    return path


def _train(folder, data, out, **settings):
    config = TrainConfig(model=str(folder), data=str(data), out=str(out), max_steps=2, batch_size=4, eval_batches=1,
                         sample_prompt=False, **settings)
    finetune(config)
    return out


def _ids(length: int, seed: int = 0, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, 50256, (rows, length), generator=torch.Generator().manual_seed(seed))


# Training and saving: every family, in this process ------------------------------------------
@pytest.fixture(scope="module")
def examples(small_data):
    """Four training examples, cut to 32 positions, in GPT-2's tokens, which every tiny checkpoint reads."""
    from instructkit.data.pipeline import encode_splits, prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.models.tokenizer import gpt2_tokenizer

    return encode_splits(prepare_data(str(small_data)), ALPACA, gpt2_tokenizer(), max_length=32)["train"][0][:4]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_and_lora_training_save_and_reload_exactly(family, checkpoints, examples, tmp_path):
    from instructkit.runs import RunFolder
    from instructkit.train.loop import build_optimizer, train_step
    from instructkit.train.runner import make_trainable, save_trained

    loaded = load_model(str(checkpoints[family]))
    before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    layers = distributed._layers(loaded.model)  # what FSDP shards one by one
    assert len(layers) == loaded.model.config.n_layers and all(type(layer).__name__ == "DecoderLayer" for layer in layers)
    # Phi-3's LoRA named by its fused HF layers, which hold the same seven here.
    targets = ["self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj"] if family == "phi3" \
        else ["attention", "mlp"]
    for rank in (0, 4):
        model, folder = copy.deepcopy(loaded.model).train(), tmp_path / f"rank{rank}"
        config = TrainConfig(lr=1e-3, lora_rank=rank, lora_alpha=8.0, lora_targets=targets)
        assert make_trainable(model, config) == (len(TARGETS) * len(layers) if rank else 0)
        train_step(model, build_optimizer(model, config), examples, [list(range(4))], pad_id=loaded.tokenizer.pad_id,
                   lr=config.lr, clip=None)
        trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        save_trained(model, config, RunFolder(folder), loaded.tokenizer_ref)
        saved = load_file(str(folder / "model.safetensors"))
        assert ("lm_head.weight" in saved) == (family in UNTIED)  # a tied head is the embedding, saved once
        reloaded = load_model(str(folder)).model.state_dict()
        assert reloaded.keys() == before.keys()
        head, embedding = reloaded["lm_head.weight"], reloaded["model.embed_tokens.weight"]
        assert (head.data_ptr() == embedding.data_ptr()) == (family not in UNTIED)
        if not rank:  # every weight moved (an untied head apart from its embedding), and was saved as trained
            assert all(not torch.equal(trained[name], before[name]) for name in before), family
            assert all(torch.equal(reloaded[name], trained[name]) for name in before)
            continue
        # LoRA: the folder holds the base plus exactly the merged adapters; every other tensor is the base's.
        adapters = load_file(str(folder / "adapter.safetensors"))
        assert len(adapters) == 2 * len(TARGETS) * len(layers)
        adapted = set()
        for name in adapters:
            if name.endswith("lora_A"):
                layer = name.removesuffix(".lora_A")
                delta = (adapters[f"{layer}.lora_B"] @ adapters[name]) * (8.0 / 4)
                assert delta.abs().max() > 0, name
                torch.testing.assert_close(reloaded[f"{layer}.weight"], before[f"{layer}.weight"] + delta, rtol=1e-5, atol=1e-6)
                adapted.add(f"{layer}.weight")
        assert {name.split(".")[-2] for name in adapted} == set(TARGETS)
        assert all(torch.equal(reloaded[name], before[name]) for name in before if name not in adapted)


# Quantized and static-step decoding: every family -------------------------------------------
def _standing_for(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of `model` whose linear layers hold the weights each quantized layer stands
    for (its kind's `reference`); the head stays fp32, as the shortlist rescores in fp32. A layer
    decoding fused with others (q/k/v, gate/up) is quantized as its group's layer, row by row."""
    reference = copy.deepcopy(model)
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, linear in reference.named_modules():
            owner, _, child = name.rpartition(".")
            groups = getattr(layers.get(owner), "FUSIBLE", {})
            replaced = layers.get(name) or next((layers[f"{owner}.{group}"] for group, members in groups.items()
                                                if child in members and f"{owner}.{group}" in layers), None)
            if isinstance(linear, torch.nn.Linear) and not isinstance(replaced, (torch.nn.Linear, ShortlistHead)):
                linear.weight.copy_(type(replaced).reference(linear.weight))
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_and_int4_decode_as_the_weights_they_stand_for_and_the_static_step_agrees(family, checkpoints, monkeypatch):
    loaded = load_model(str(checkpoints[family]))
    prompts = [loaded.tokenizer.encode(text) for text in ("Hello there", "The quick brown fox jumps over the lazy dog")]
    ids = _ids(24, seed=2, rows=1)  # a prefill (decoding steps take our kernels)
    for mode in ("int8", "int4"):
        quantized = quantize_model(copy.deepcopy(loaded.model), mode)
        assert isinstance(quantized.lm_head, ShortlistHead)
        reference = _standing_for(loaded.model, quantized)
        with torch.no_grad(), monkeypatch.context() as patch:
            # The weights themselves, on the dequantized-weights path (exact inputs): int8's VNNI
            # kernel, which takes prefills where the processor has it, puts the inputs on a 16-bit
            # grid first (bounded in tests/test_quantize.py).
            patch.setattr(Int8GroupLinear, "kernel_takes_prefill", lambda self: False)
            ours, theirs = quantized(ids), reference(ids)
        kept = torch.isfinite(ours)
        assert (kept.sum(-1) == 32).all(), (family, mode)  # the shortlist: -inf elsewhere, soft-capped too
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), (family, mode)
        assert (ours[kept] - theirs[kept]).abs().max().item() <= 1e-4, (family, mode)
        with torch.no_grad():  # as prefills run (the kernel's where it takes them): the same choices
            assert torch.equal(quantized(ids).argmax(-1), theirs.argmax(-1)), (family, mode)
        expected = [r.token_ids for r in generate(reference, loaded.tokenizer, prompts, max_new_tokens=10, stop_ids=())]
        assert [r.token_ids for r in generate(quantized, loaded.tokenizer, prompts, max_new_tokens=10, stop_ids=())] == expected
        # The static-shape step (--compile's graph, here eager), batched, past the windows.
        static = static_decode.enable(quantized, compile=False)
        assert [r.token_ids for r in generate(static, loaded.tokenizer, prompts, max_new_tokens=10, stop_ids=())] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_static_steps_give_the_full_forward_passs_logits(family, checkpoints):
    """Token by token through the static step (fp32: its attention is csrc's one-query kernel,
    except under Gemma 2's soft-capped scores, which the kernel does not cap), past the windows."""
    model = load_model(str(checkpoints[family])).model
    ids = _ids(20, seed=6, rows=1)
    with torch.no_grad():
        expected = model(ids)[0]
    static_decode.enable(model, compile=False)
    cache = model.new_cache(1, 32)
    steps = torch.stack([model.static_step(ids[:, i : i + 1], torch.tensor([[i]]), cache)[0] for i in range(20)])
    assert cache.one_query_kernel
    assert (steps - expected).abs().max().item() <= 2e-4, family


def test_the_compiled_step_with_every_switch_at_once(checkpoints):
    """One compile for all families: Gemma 2's soft-capped scores (no one-query kernel) and
    logits, sandwich norms and alternating windows, with Phi-3's longrope and partial rotary,
    Qwen 2's q/k/v biases and OLMo 2's whole-projection QK-norm, int8 as chat runs it."""
    loaded = load_model(str(checkpoints["gemma2"]))
    config = loaded.model.config
    assert config.attn_softcap and config.final_softcap and config.sliding_window
    # Two layers: one sliding, one global. Longrope's original context of 12 positions is passed
    # while decoding, so both of its factor sets run.
    config = dataclasses.replace(config, n_layers=2, qkv_bias=True, qk_norm="full", rotary_dim=8, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 12, "short_factor": [1.0, 1.1, 1.2, 1.5],
        "long_factor": [1.0, 2.0, 3.0, 4.0]})
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3)
    model = quantize_model(model, "int8")
    prompts = [loaded.tokenizer.encode("The quick brown fox"), loaded.tokenizer.encode("Hello")]
    expected = [generate(model, loaded.tokenizer, [p], max_new_tokens=14, stop_ids=())[0].token_ids for p in prompts]
    static_decode.enable(model)  # compiles
    assert [generate(model, loaded.tokenizer, [p], max_new_tokens=14, stop_ids=())[0].token_ids for p in prompts] == expected


# DPO's log-probs: every family's own head ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_logprobs_come_through_the_familys_head(family, checkpoints):
    model = load_model(str(checkpoints[family])).model
    inputs, targets = _ids(14, seed=3, rows=4), _ids(14, seed=4, rows=4)
    targets[:, :5] = IGNORE_INDEX
    targets[1, 10:] = IGNORE_INDEX
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, inputs, targets, "sum")
        expected = -F.cross_entropy(model(inputs).transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none").sum(dim=1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [9, 5, 9, 9]
    if family in ("gemma2", "llama"):  # DPO's gradient through the soft-capped head (and an untied one) raises the margin
        policy, reference = copy.deepcopy(model).train(), model
        with torch.no_grad():
            ref, _ = sequence_logprobs(reference, inputs, targets, "mean")
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
        margins = []
        for step in range(2):
            logps, _ = sequence_logprobs(policy, inputs, targets, "mean")
            losses, chosen, rejected = dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
            margins.append(float((chosen - rejected).mean()))
            if step == 0:
                losses.mean().backward()
                optimizer.step()
        assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[1] > 1e-3


def test_a_run_is_never_written_into_a_hugging_face_model_folder(checkpoints, small_data, tmp_path):
    """An HF folder's config.json is the model's, so `--model FOLDER` loads it as a model (not a
    run folder); for the same reason `--out FOLDER` must not take it for an empty run folder."""
    from instructkit.errors import UserError

    folder = tmp_path / "hf"
    folder.mkdir()
    config = (checkpoints["qwen3"] / "config.json").read_bytes()
    (folder / "config.json").write_bytes(config)
    with pytest.raises(UserError, match="holds a Hugging Face model"):
        _train(checkpoints["qwen3"], small_data, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"] and (folder / "config.json").read_bytes() == config


# The commands as typed ----------------------------------------------------------------------
def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_job(folder, data, out, *extra):
    return _ok(run_cli("run", "--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2",
                       "--batch-size", "4", "--eval-batches", "1", "--no-sample", "--max-new-tokens", "4", "--max-length", "64",
                       "--base-max-new-tokens", "4", "--base-shots", "0", "--beams", "1", "--threads", "2", *extra))


@pytest.fixture(scope="module")
def phi3_run(checkpoints, small_data, tmp_path_factory):
    """The main job on Phi-3 with its recipe (full fine-tuning, the embedding frozen)."""
    out = tmp_path_factory.mktemp("phi3") / "run"
    _run_job(checkpoints["phi3"], small_data, out, "--lora-rank", "0")
    return out


def test_the_main_job_on_phi3_freezes_its_untied_embedding_and_head(phi3_run, checkpoints):
    responses = json.loads((phi3_run / "test-responses.json").read_text())
    base_responses = json.loads((phi3_run / "base-responses.json").read_text())
    assert len(responses) == len(base_responses) == 4 and all(isinstance(r["model_response"], str) for r in responses)
    assert json.loads((phi3_run / "evaluation.json").read_text())
    before = load_model(str(checkpoints["phi3"])).model.state_dict()
    after = load_model(str(phi3_run)).model.state_dict()
    frozen = {"lm_head.weight", "model.embed_tokens.weight"}
    assert all(torch.equal(after[name], before[name]) for name in frozen)
    assert all(not torch.equal(after[name], before[name]) for name in before if name not in frozen)


def test_phi3_export_reloads_in_transformers_and_our_loader(phi3_run, tmp_path):
    out = tmp_path / "hf"
    _ok(run_cli("export", "--run", str(phi3_run), "--format", "hf", "--out", str(out)))
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    ours = load_model(str(phi3_run)).model
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    again = load_for_talk(model=str(out), prompt_style="phi3").model  # an HF folder is a model, not a run folder
    ids = _ids(24, seed=5)
    with torch.no_grad():
        expected = ours(ids)
        assert (reloaded(ids).logits - expected).abs().max().item() <= 1e-4
        assert (again(ids) - expected).abs().max().item() <= 1e-4


def test_serve_phi3_and_its_base_model_from_a_hugging_face_folder(phi3_run, checkpoints):
    openai = require_module("openai")
    from .serve_helpers import running_server

    question = [{"role": "user", "content": "Name three colors."}]
    with running_server("--run", str(phi3_run), "--compare-base", "--threads", "2", "--quantize", "int8") as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        served = [m.id for m in client.models.list().data]
        assert served == [phi3_run.name, "phi3"]
        for name, spec in zip(served, (dict(run=str(phi3_run)), dict(model=str(checkpoints["phi3"]), prompt_style="phi3"))):
            ready = load_for_talk(quantize="int8", **spec)
            ids = encode_conversation(ready.style, question, ready.tokenizer)
            expected = generate(ready.model, ready.tokenizer, [ids], max_new_tokens=12, stop_ids=ready.style.stop_ids(ready.tokenizer),
                                stop_strings=ready.style.stop_strings)[0]
            reply = client.chat.completions.create(model=name, messages=question, temperature=0, max_tokens=12)
            assert reply.choices[0].message.content == expected.text, name
            assert reply.usage.completion_tokens == len(expected.token_ids) and reply.usage.prompt_tokens == len(ids)


@pytest.fixture(scope="module")
def gemma2_run(checkpoints, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma2") / "run"
    _ok(run_cli("finetune", "--model", str(checkpoints["gemma2"]), "--data", str(small_data), "--out", str(out),
                "--max-steps", "2", "--batch-size", "4", "--eval-batches", "1", "--lora-rank", "4", "--max-length", "64",
                "--no-sample"))
    return out


def test_gemma2_finetune_respond_int8_and_evaluate(gemma2_run):
    responses = gemma2_run / "test.json"
    _ok(run_cli("respond", "--run", str(gemma2_run), "--split", "test", "--out", str(responses), "--max-new-tokens", "6",
                "--quantize", "int8"))
    answered = json.loads(responses.read_text())
    assert len(answered) == 4 and all(isinstance(r["model_response"], str) for r in answered)
    _ok(run_cli("evaluate", "--responses", str(responses), "--out", str(gemma2_run / "evaluation")))
    evaluation = json.loads((gemma2_run / "evaluation" / "evaluation.json").read_text())
    assert evaluation


def test_gemma2_dpo_command(gemma2_run, small_preferences, tmp_path):
    out = tmp_path / "dpo"
    _ok(run_cli("dpo", "--run", str(gemma2_run), "--data", str(small_preferences), "--out", str(out), "--max-steps", "2",
                "--batch-size", "2", "--eval-batches", "1", "--lr", "1e-4", "--max-length", "64", "--threads", "2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The policy starts as the reference, so the soft-capped log-probs of both agree: ln 2.
    assert rows[0]["kind"] == "eval" and rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(row["loss"]) for row in rows if row["kind"] == "step")
    before, after = load_file(str(gemma2_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(not torch.equal(after[name], before[name]) for name in before)


def test_olmo2_main_job_with_lora_then_chat(checkpoints, small_data, tmp_path):
    pexpect = require_module("pexpect")
    run = tmp_path / "run"
    _run_job(checkpoints["olmo2"], small_data, run, "--lora-rank", "4")
    assert len(load_file(str(run / "adapter.safetensors"))) == 2 * len(TARGETS) * 3
    assert len(json.loads((run / "test-responses.json").read_text())) == 4

    ready = load_for_talk(run=str(run), quantize="auto")  # as chat loads it
    from instructkit.serve.chat import ChatSession

    expected, tokens, _ = ChatSession(ready.loaded, ready.style, max_tokens=8).answer("Hello there", lambda piece: None)
    child = pexpect.spawn(sys.executable, ["-m", "instructkit", "chat", "--run", str(run), "--max-new-tokens", "8",
                                           "--threads", "1"], encoding="utf-8", timeout=180, dimensions=(40, 200))
    child.expect(r"Chatting with run \(prompt style alpaca, greedy\)")
    child.expect(">>> ")
    child.sendline("Hello there")
    child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s\]")
    assert int(child.match.group(1)) == tokens
    assert expected.strip() and expected.strip() in child.before.replace("\r\n", "\n")
    child.expect(">>> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.wait()  # its own exit, not close()'s signal to a process still tearing down (test_chat)
    assert child.exitstatus == 0


def test_two_processes_fsdp_on_llama_equal_one(checkpoints, small_data, tmp_path):
    one = _train(checkpoints["llama"], small_data, tmp_path / "one", max_length=64)
    two = tmp_path / "two"
    _ok(run_cli("finetune", "--model", str(checkpoints["llama"]), "--data", str(small_data), "--out", str(two),
                "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1", "--max-length", "64", "--no-sample", "--nproc", "2",
                "--strategy", "fsdp"))

    def losses(run):
        return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "step"]

    assert losses(two) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == 2
    expected, actual = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert expected.keys() == actual.keys() and "lm_head.weight" in actual  # the untied head, gathered whole
    assert all(torch.allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6) for name in expected)
