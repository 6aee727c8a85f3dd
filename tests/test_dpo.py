"""DPO: closed-form losses, log-probs against cross-entropy, the reference that never moves,
boundaries from token spans, resume, and the command end to end on a tiny model."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from instructkit.data.preferences import encode_pairs, load_preferences
from instructkit.data.prompts import get_prompt_style
from instructkit.data.tokenize import IGNORE_INDEX
from instructkit.errors import UserError
from instructkit.models.registry import load_model
from instructkit.train.dpo import dpo_loss, pair_batch, reference_logprobs, sequence_logprobs

from .conftest import kill_at_checkpoint, run_cli

POLICY_CHOSEN, POLICY_REJECTED = [-3.0, -2.5, -4.0, -1.5], [-5.0, -3.5, -6.0, -2.5]
REF_CHOSEN, REF_REJECTED = [-2.8, -2.3, -3.8, -1.4], [-3.2, -2.7, -4.2, -1.8]


def _closed_form(beta, loss, smoothing):
    """The losses written out with math, apart from the implementation."""
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    values = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED):
        h = (pc - pr) - (rc - rr)
        if loss == "sigmoid":
            values.append(-(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h))
        elif loss == "ipo":
            values.append((h - 1 / (2 * beta)) ** 2)
        else:
            values.append((-(1 - smoothing) * log_sigmoid(beta * h) + smoothing * log_sigmoid(-beta * h)) / (1 - 2 * smoothing))
    return sum(values) / len(values)


@pytest.mark.parametrize("beta, loss, smoothing, pinned", [
    (0.1, "sigmoid", 0.0, 0.639970), (0.5, "sigmoid", 0.0, 0.462728),  # the golden values
    (0.1, "sigmoid", 0.1, 0.650970), (0.5, "sigmoid", 0.1, 0.517728),
    (0.1, "ipo", 0.0, 15.46), (0.5, "ipo", 0.0, 0.26), (0.1, "robust", 0.1, 0.626220), (0.5, "robust", 0.1, 0.393978)])
def test_losses_equal_their_closed_form(beta, loss, smoothing, pinned):
    tensors = [torch.tensor(v, dtype=torch.float64) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    losses, reward_chosen, reward_rejected = dpo_loss(*tensors, beta=beta, loss=loss, label_smoothing=smoothing)
    assert losses.mean().item() == pytest.approx(pinned, abs=1e-6)
    assert losses.mean().item() == pytest.approx(_closed_form(beta, loss, smoothing), abs=1e-9)
    assert torch.allclose(reward_chosen, beta * (tensors[0] - tensors[2]))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-gpt2", seed=3)


@pytest.fixture(scope="module")
def pairs(tiny, shared_data):
    prefs = load_preferences(str(shared_data / "instruction-data-with-preference.json"))
    encoded, _ = encode_pairs(prefs.splits.train[:12], get_prompt_style("alpaca"), tiny.tokenizer)
    return encoded


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_policy_equal_to_reference_gives_ln2_and_zero_margins(tiny, pairs, reduction):
    batch = pairs[:6]  # responses of different lengths: the batch is padded
    inputs, targets = pair_batch(batch, tiny.tokenizer.pad_id)
    assert (targets == IGNORE_INDEX).any(dim=1).all() and inputs.shape[1] > min(len(p.chosen) for p in batch)
    policy, reference = copy.deepcopy(tiny.model).train(), copy.deepcopy(tiny.model).eval()
    logps, _ = sequence_logprobs(policy, inputs, targets, reduction)
    with torch.no_grad():
        ref, _ = sequence_logprobs(reference, inputs, targets, reduction)
    losses, chosen, rejected = dpo_loss(logps[:6], logps[6:], ref[:6], ref[6:], beta=0.1)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(chosen.abs() < 1e-6) and torch.all(rejected.abs() < 1e-6)


def test_logprobs_equal_minus_cross_entropy_and_ignore_padding(tiny, pairs):
    inputs, targets = pair_batch(pairs[:4], tiny.tokenizer.pad_id)
    with torch.no_grad():
        sums, counts = sequence_logprobs(tiny.model, inputs, targets, "sum")
        means, _ = sequence_logprobs(tiny.model, inputs, targets, "mean")
        logits = tiny.model(inputs)
    reference = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                   reduction="none").sum(dim=1)
    torch.testing.assert_close(sums, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(means, reference / counts, rtol=1e-5, atol=1e-5)
    wider_inputs = torch.cat([inputs, torch.full((inputs.shape[0], 7), tiny.tokenizer.pad_id)], dim=1)
    wider_targets = torch.cat([targets, torch.full((targets.shape[0], 7), IGNORE_INDEX)], dim=1)
    with torch.no_grad():
        padded, _ = sequence_logprobs(tiny.model, wider_inputs, wider_targets, "sum")
    torch.testing.assert_close(padded, sums, rtol=1e-5, atol=1e-5)


def test_trainable_head_gives_the_same_logprobs_and_gradients_as_a_frozen_one(tiny, pairs):
    inputs, targets = pair_batch(pairs[:3], tiny.tokenizer.pad_id)
    weights = torch.linspace(-1, 1, 6)
    grads = []
    for head_trains in (True, False):
        model = copy.deepcopy(tiny.model)
        model.lm_head.weight.requires_grad_(head_trains)
        logps, _ = sequence_logprobs(model, inputs, targets, "mean")
        (logps * weights).sum().backward()
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_sum_at_beta_equals_mean_at_beta_times_length():
    length = 7.0
    policy = torch.tensor([-14.0, -21.0]), torch.tensor([-28.0, -35.0])
    ref = torch.tensor([-13.3, -20.3]), torch.tensor([-27.3, -34.3])
    summed, _, _ = dpo_loss(*policy, *ref, beta=0.1)
    mean, _, _ = dpo_loss(*(x / length for x in policy), *(x / length for x in ref), beta=0.1 * length)
    torch.testing.assert_close(summed, mean)


def test_precomputed_reference_equals_on_the_fly(tiny, pairs):
    precomputed = reference_logprobs(copy.deepcopy(tiny.model).train(), pairs, tiny.tokenizer.pad_id, "mean", 5)
    for start in range(0, len(pairs), 4):
        chunk = pairs[start : start + 4]
        inputs, targets = pair_batch(chunk, tiny.tokenizer.pad_id)
        with torch.no_grad():
            logps, _ = sequence_logprobs(tiny.model.eval(), inputs, targets, "mean")
        torch.testing.assert_close(precomputed[start : start + len(chunk)], torch.stack([logps[: len(chunk)],
                                                                                          logps[len(chunk):]], 1),
                                   atol=1e-6, rtol=0)
    # Only the pairs a run reads: the same rows, and NaN (never a silent 0) for the others.
    some = reference_logprobs(tiny.model, pairs, tiny.tokenizer.pad_id, "mean", 3, needed=[5, 0, 2])
    torch.testing.assert_close(some[[0, 2, 5]], precomputed[[0, 2, 5]], atol=1e-6, rtol=0)
    assert torch.isnan(some[[1, 3, 4]]).all() and torch.isnan(some[6:]).all()


@pytest.mark.parametrize("model, style", [("tiny-gpt2", "alpaca"), ("tiny-gemma3", "gemma")])
def test_first_supervised_token_starts_the_response(model, style):
    tokenizer = load_model(model).tokenizer
    record = {"instruction": "Rewrite politely.", "input": "Give me the salt.", "chosen": "Could you pass the salt, please?",
              "rejected": "Salt. Now."}
    (pair,), report = encode_pairs([record], get_prompt_style(style), tokenizer)
    for example, text in ((pair.chosen, record["chosen"]), (pair.rejected, record["rejected"])):
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert tokenizer.decode(example.input_ids[first:-1]) == text
        assert text.startswith(tokenizer.decode([example.input_ids[first]]))


def test_data_faults_identical_pairs_and_empty_responses(tmp_path, tiny):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "chosen": "x", "rejected": "y"}, {"instruction": "b", "chosen": ""}]))
    with pytest.raises(UserError, match=r"record 1: missing key 'rejected'"):
        load_preferences(str(bad))
    records = [{"instruction": f"q{i}", "input": "", "chosen": f"yes {i}", "rejected": f"no {i}" if i % 5 else f"yes {i}"}
               for i in range(40)]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    prefs = load_preferences(str(data))
    assert prefs.identical == 8 and len(prefs.records) == 32
    long_prompt = [{"instruction": "word " * 80, "input": "", "chosen": "yes", "rejected": "no"}]
    pairs, report = encode_pairs(long_prompt, get_prompt_style("alpaca"), tiny.tokenizer, max_length=20)
    assert pairs == [] and report.truncated_away == 1


def _dpo_args(run, data, out, *extra):
    return ["dpo", "--run", str(run), "--data", str(data), "--out", str(out), "--max-steps", "8", "--batch-size", "4",
            "--eval-every", "4", "--eval-batches", "1", "--save-every", "2", "--threads", "2", *extra]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, chapter_data_path):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                   "--max-steps", "2", "--eval-batches", "1", "--no-sample").returncode == 0
    return out


def test_one_step_raises_the_margin_and_the_reference_never_moves(tiny, pairs):
    from instructkit.train.config import TrainConfig
    from instructkit.train.loop import build_optimizer

    policy, reference = copy.deepcopy(tiny.model).train(), copy.deepcopy(tiny.model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    frozen = {name: p.clone() for name, p in reference.named_parameters()}
    batch = pairs[:4]
    inputs, targets = pair_batch(batch, tiny.tokenizer.pad_id)
    with torch.no_grad():
        ref, _ = sequence_logprobs(reference, inputs, targets, "mean")
    optimizer = build_optimizer(policy, TrainConfig(lr=1e-3, weight_decay=0.0))
    margins = []
    for _ in range(3):
        logps, _ = sequence_logprobs(policy, inputs, targets, "mean")
        losses, chosen, rejected = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)
        margins.append(float((chosen - rejected).mean()))
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    assert margins[1] > margins[0] and margins[2] > margins[1]
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(p, frozen[name]) for name, p in reference.named_parameters())
    assert not torch.equal(policy.transformer.h[0].mlp.c_fc.weight, tiny.model.transformer.h[0].mlp.c_fc.weight)


def test_overfitting_four_pairs_reaches_full_reward_accuracy(tiny, pairs):
    from instructkit.train.config import TrainConfig
    from instructkit.train.loop import build_optimizer

    policy, reference = copy.deepcopy(tiny.model).train(), copy.deepcopy(tiny.model).eval()
    inputs, targets = pair_batch(pairs[:4], tiny.tokenizer.pad_id)
    with torch.no_grad():
        ref, _ = sequence_logprobs(reference, inputs, targets, "mean")
    optimizer = build_optimizer(policy, TrainConfig(lr=3e-3, weight_decay=0.0))
    for _ in range(25):
        logps, _ = sequence_logprobs(policy, inputs, targets, "mean")
        losses, chosen, rejected = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    assert float(((chosen - rejected) > 0).float().mean()) == 1.0 and losses.mean().item() < math.log(2)


def test_dpo_command_writes_a_run_and_resumes_to_identical_weights(sft_run, shared_data, tmp_path):
    data = shared_data / "instruction-data-with-preference.json"
    reference, killed = tmp_path / "a", tmp_path / "b"
    result = run_cli(*_dpo_args(sft_run, data, reference))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 with identical responses" in result.stdout + result.stderr
    for name in ("config.json", "prompt_style.json", "model.safetensors", "metrics.jsonl", "loss-plot.png",
                 "loss-plot.pdf", "reward-margins-plot.png", "reward-margins-plot.pdf"):
        assert (reference / name).is_file(), name
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 8 and {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logp_chosen",
                                 "reward_margin_unscaled"} <= set(steps[0])
    assert rows[0]["kind"] == "eval" and rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert "Ep 1 (Step 000004): Train loss" in result.stdout + result.stderr

    kill_at_checkpoint(_dpo_args(sft_run, data, killed), killed, 4)
    resumed = run_cli("dpo", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, actual = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    evaluated = run_cli("evaluate", "--preferences", str(reference), "--max-new-tokens", "8")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((reference / "evaluation-preferences.json").read_text())
    assert report["pairs"] > 50 and 0 <= report["implicit_reward"]["dpo"]["accuracy"] <= 1
    assert (reference / "report-preferences.md").read_text().startswith("# Preference evaluation (DPO)")


def test_precompute_ref_run_equals_the_two_model_run(sft_run, shared_data, tmp_path):
    data = shared_data / "instruction-data-with-preference.json"
    runs = {}
    for name, extra in (("two", []), ("pre", ["--precompute-ref"])):
        result = run_cli(*_dpo_args(sft_run, data, tmp_path / name, "--max-steps", "3"), *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["kind"] == "step"]
    assert runs["two"] == pytest.approx(runs["pre"], abs=1e-5)


def test_dpo_refuses_bad_options_with_one_line(sft_run, shared_data, tmp_path):
    data = shared_data / "instruction-data-with-preference.json"
    for extra, words in ((["--loss", "hinge"], "--loss must be one of sigmoid, ipo, robust"),
                         (["--beta", "0"], "--beta and --lr must be positive"),
                         (["--logp-reduction", "max"], "--logp-reduction must be mean or sum")):
        result = run_cli(*_dpo_args(sft_run, data, tmp_path / "x"), *extra)
        assert result.returncode == 2 and words in result.stderr and not (tmp_path / "x").exists()


def test_epoch_batches_are_full_disjoint_and_grouping_pads_less(tiny, shared_data):
    """Both orders give len // batch full batches with no pair twice; length grouping pads the
    chapter's pairs less than the book's shuffled order."""
    from instructkit.data.batching import padding_share
    from instructkit.train.dpo import _pair_length, epoch_batches

    prefs = load_preferences(str(shared_data / "instruction-data-with-preference.json"))
    pairs, _ = encode_pairs(prefs.splits.train, get_prompt_style("alpaca"), tiny.tokenizer)
    lengths = [_pair_length(p) for p in pairs]
    shares = {}
    for batching in ("grouped", "chapter"):
        batches = epoch_batches(pairs, 8, batching=batching, seed=123)
        flat = [i for batch in batches for i in batch]
        assert len(batches) == len(pairs) // 8 and all(len(batch) == 8 for batch in batches)
        assert len(set(flat)) == len(flat)
        assert epoch_batches(pairs, 8, batching=batching, seed=123) == batches  # a resume sees the same order
        shares[batching] = padding_share(batches, lengths)
    assert shares["grouped"] < shares["chapter"] / 3


def test_drift_warning_only_when_the_chosen_responses_lose_likelihood():
    from instructkit.train.dpo import drift_warning

    holding = {"step": 40, "val_logp_chosen": -1.68, "val_ref_logp_chosen": -1.82}
    assert drift_warning(holding) is None
    drifting = dict(holding, step=60, val_logp_chosen=-2.64)
    line = drift_warning(drifting)
    assert "step 60" in line and "-2.640" in line and "-1.820" in line and "--max-steps" in line
    assert "\n" not in line


def _losses_and_lrs(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"], [r["lr"] for r in rows if r["kind"] == "step"]


def test_dpo_has_the_loops_accumulation_and_cosine_schedule(sft_run, shared_data, tmp_path):
    """DPO runs through finetune's loop: batch 2 x accumulation 2 trains as batch 4 (the step's
    loss is the mean over all its pairs and chosen tokens), and the cosine schedule applies."""
    from instructkit.train.fit import lr_at

    data = shared_data / "instruction-data-with-preference.json"
    runs = {}
    for name, extra in (("big", ["--batch-size", "4"]), ("accum", ["--batch-size", "2", "--grad-accum", "2"])):
        out = tmp_path / name
        result = run_cli(*_dpo_args(sft_run, data, out, "--max-steps", "4", "--lr", "1e-4", "--sft-weight", "0.5",
                                    "--schedule", "cosine", "--warmup", "1"), *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = out
    (big, lrs), (accum, _) = _losses_and_lrs(runs["big"]), _losses_and_lrs(runs["accum"])
    assert accum == pytest.approx(big, rel=1e-5)
    assert lrs == pytest.approx([lr_at(step, 1e-4, 1, "cosine", 4) for step in range(4)]) and lrs[-1] < lrs[1]
    expected, actual = load_file(str(runs["big"] / "model.safetensors")), load_file(str(runs["accum"] / "model.safetensors"))
    assert all(torch.allclose(expected[n], actual[n], rtol=1e-4, atol=1e-6) for n in expected)


def test_dpo_stops_early_when_validation_loss_stalls(sft_run, shared_data, tmp_path):
    """A learning rate too small to move any weight leaves the validation loss exactly where it
    was: --early-stop 1 ends the run at the first evaluation after the start."""
    out = tmp_path / "stalled"
    result = run_cli(*_dpo_args(sft_run, shared_data / "instruction-data-with-preference.json", out, "--lr", "1e-30",
                                "--eval-every", "1", "--early-stop", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Early stop: validation loss has not improved for 1 evaluations" in result.stdout + result.stderr
    losses, _ = _losses_and_lrs(out)
    assert len(losses) == 1 and (out / "model.safetensors").is_file()
