"""Exports, verified by reloading them where users run them: transformers (HF), llama.cpp (GGUF),
Go's text/template (Ollama's TEMPLATE; Ollama itself cannot run here)."""

import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from instructkit.data.pipeline import prepare_data
from instructkit.data.prompts import PROMPT_STYLES, get_prompt_style
from instructkit.export import export_model
from instructkit.export.templates import go_template
from instructkit.models.registry import load_model

from .conftest import require_module, require_program, kill_at_checkpoint, run_cli
from .test_llama_cpp_parity import corpus

transformers = require_module("transformers")
llama_cpp = require_module("llama_cpp")

RECORDS = [{"instruction": "Rewrite the sentence in passive voice.", "input": "The cat ate the fish."},
           {"instruction": "Name three primary colors.", "input": ""}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "Another one, please — with ünïcödé 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c\n\nwith a blank line"}],
]


def _tiny_run(tmp_path_factory, model: str, chapter_data_path, *extra):
    out = tmp_path_factory.mktemp(model) / "run"
    result = run_cli("finetune", "--model", model, "--data", str(chapter_data_path), "--out", str(out), "--max-steps", "2",
                     "--eval-batches", "1", "--no-sample", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, chapter_data_path):
    return {"tiny-gpt2": _tiny_run(tmp_path_factory, "tiny-gpt2", chapter_data_path),
            "tiny-gemma3": _tiny_run(tmp_path_factory, "tiny-gemma3", chapter_data_path, "--lora-rank", "4")}


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([x])).logits[0].double() for x in ids]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_hf_export_of_a_run_reloads_in_transformers(tiny_runs, tmp_path, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    result = run_cli("export", "--run", str(tiny_runs[name]), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (out / file).is_file(), file
    ours = load_model(str(tiny_runs[name]))
    style = get_prompt_style(json.loads((tiny_runs[name] / "prompt_style.json").read_text())["name"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog. " * 3, style.prompt(RECORDS[0]), "ünïcödé 😀"]
    ids = [ours.tokenizer.encode(text) for text in texts]
    assert [tokenizer(text)["input_ids"] for text in texts] == ids
    for theirs, text_ids in zip(_hf_logits(out, ids), ids):  # incl. prompts longer than tiny Gemma's 6-token window
        with torch.no_grad():
            mine = ours.model(torch.tensor([text_ids]))[0].double()
        assert (theirs - mine).abs().max().item() <= 1e-4
    bos = tokenizer.bos_token if ours.tokenizer.bos_id is not None else ""
    for record in RECORDS:
        messages = [{"role": "user", "content": style.user_content(record)}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == bos + style.prompt(record)  # byte for byte, after the BOS our tokenizer adds
        assert list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)) \
            == ours.tokenizer.encode(style.prompt(record))
    from instructkit.serve.conversation import encode_conversation

    for messages in CONVERSATIONS:  # with history: earlier answers closed as training closed them
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == bos + style.conversation(messages, ours.tokenizer.eos_text), (name, messages)
        assert list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)) \
            == encode_conversation(style, messages, ours.tokenizer)


def test_hf_export_of_the_real_default_model(tmp_path, monkeypatch):
    """Gemma 3 270M, with a prompt past its 512-token sliding window."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load_model("gemma-3-270m")
    export_model(ours, get_prompt_style("gemma"), "hf", tmp_path / "hf")
    long_text = " ".join(record["output"] for record in prepare_data("builtin").loaded.records[:300])
    ids = [ours.tokenizer.encode("The capital of France is"), ours.tokenizer.encode(long_text)[:700]]
    assert len(ids[1]) == 700
    for theirs, text_ids in zip(_hf_logits(tmp_path / "hf", ids), ids):
        with torch.no_grad():
            mine = ours.model(torch.tensor([text_ids]))[0].double()
        assert (theirs - mine).abs().max().item() <= 1e-4


def test_chat_templates_render_every_conversation_like_our_rule():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from instructkit.export.templates import jinja_chat_template

    for style in PROMPT_STYLES.values():
        template = ImmutableSandboxedEnvironment().from_string(jinja_chat_template(style, bos=True))
        for messages in CONVERSATIONS:
            rendered = template.render(messages=messages, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
            assert rendered == "<bos>" + style.conversation(messages, "<eos>"), (style.name, messages)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var input struct {
		Template string
		System   string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(input.Template))
	data := map[string]any{"System": input.System, "Messages": input.Messages}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


def _model_template_styles() -> dict:
    """Styles that are models' own chat templates: SmolLM2's (inside its GGUF, with a default system
    turn) and Qwen2.5's (../shared, a default system prompt of its own)."""
    from instructkit.data.prompts import model_style

    from .conftest import SHARED_DATA

    smollm2 = load_model("smollm2-135m-instruct")
    qwen = (SHARED_DATA / "chat-templates" / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    return {"smollm2": model_style(smollm2.chat_template, smollm2.tokenizer),
            "qwen2.5": dataclasses.replace(model_style(qwen, smollm2.tokenizer), name="qwen2.5")}


def test_ollama_template_renders_like_our_rule_in_gos_text_template(tmp_path):
    """Ollama cannot run here; its TEMPLATE is Go's text/template, which Go itself renders. Our
    named styles, and models' own chat templates translated to Go (export/templates.py), render
    every conversation as our training and prompts do."""
    go = require_program("go", "Debian's golang package; .ci/run installs it")
    program = tmp_path / "render.go"
    program.write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    binary = tmp_path / "render"
    subprocess.run([go, "build", "-o", str(binary), str(program)], check=True, env=env, timeout=300)
    styles = {**PROMPT_STYLES, **_model_template_styles()}
    for style in styles.values():
        for messages in CONVERSATIONS:
            for system_from_modelfile in (False, True):
                turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
                system = ""
                if system_from_modelfile and messages[0]["role"] == "system":  # Ollama's .System, not in .Messages
                    system, turns = messages[0]["content"], turns[1:]
                payload = json.dumps({"Template": go_template(style, "<eos>"), "System": system, "Messages": turns})
                rendered = subprocess.run([str(binary)], input=payload, capture_output=True, text=True, check=True,
                                          timeout=60).stdout
                assert rendered == style.conversation(messages, "<eos>"), (style.name, messages, system_from_modelfile)


def test_a_chat_template_go_cannot_express_is_refused_naming_the_construct():
    from instructkit.data.prompts import model_style
    from instructkit.errors import UserError

    from .conftest import SHARED_DATA

    tokenizer = load_model("smollm2-135m-instruct").tokenizer
    llama3 = (SHARED_DATA / "chat-templates" / "llama-3-instruct.jinja").read_text().replace("    ", "").replace("\n", "")
    with pytest.raises(UserError, match=r"cannot be written as Ollama's Go template: it trims message text \(\| trim\)"):
        go_template(model_style(llama3.replace("<|eot_id|>", "<|im_end|>"), tokenizer))
    numbered = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ loop.index }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(UserError, match="cannot be made role by role"):
        go_template(model_style(numbered, tokenizer))


def test_ollama_export_writes_a_modelfile(tmp_path):
    out = tmp_path / "ollama"
    result = run_cli("export", "--model", "gemma-3-270m", "--format", "ollama", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"") and (out / "model.gguf").stat().st_size > 1e8
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and 'PARAMETER stop "<start_of_turn>"' in modelfile
    assert go_template(get_prompt_style("gemma")) in modelfile
    assert f"ollama create ollama -f {out / 'Modelfile'}" in result.stdout and "ollama run ollama" in result.stdout


def test_export_refuses_bad_requests_with_one_line(tiny_runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for file in tiny_runs["tiny-gpt2"].iterdir():
        if file.is_file():
            (unfinished / file.name).write_bytes(file.read_bytes())
    (unfinished / "checkpoint").mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["--run", str(unfinished), "--format", "hf", "--out", str(tmp_path / "a")], "the run is unfinished"),
        (["--run", str(tiny_runs["tiny-gpt2"]), "--format", "hf", "--out", str(busy)], "exists and is not empty; pass --force"),
        (["--run", str(tiny_runs["tiny-gpt2"]), "--format", "gguf", "--quant", "q3_x", "--out", str(tmp_path / "b")],
         "--quant 'q3_x' is not one of f32, f16, q8_0, q4_k_m"),
        (["--run", str(tiny_runs["tiny-gpt2"]), "--format", "onnx", "--out", str(tmp_path / "c")], "--format 'onnx'"),
    ]
    for args, words in cases:
        result = run_cli("export", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("instructkit: error")]
        assert result.returncode == 2 and len(errors) == 1 and words in errors[0], (args, result.stderr)
    assert (busy / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    forced = run_cli("export", "--run", str(tiny_runs["tiny-gpt2"]), "--format", "hf", "--out", str(busy), "--force")
    assert forced.returncode == 2 and "no instructkit-export.json" in forced.stderr  # --force replaces only an export
    assert (busy / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_export_of_a_resumed_run_equals_the_uninterrupted_one(chapter_data_path, tmp_path):
    args = ["finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--max-steps", "16", "--save-every", "2",
            "--eval-every", "8", "--eval-batches", "1", "--no-sample"]
    assert run_cli(*args, "--out", str(tmp_path / "a")).returncode == 0
    kill_at_checkpoint([*args, "--out", str(tmp_path / "b")], tmp_path / "b", 6)
    assert run_cli("finetune", "--resume", str(tmp_path / "b")).returncode == 0
    for run in ("a", "b"):
        assert run_cli("export", "--run", str(tmp_path / run), "--format", "hf", "--out", str(tmp_path / f"{run}-hf")).returncode == 0
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a-hf" / file).read_bytes() == (tmp_path / "b-hf" / file).read_bytes(), file


# GGUF, on a real fine-tuned Gemma 3 270M ------------------------------------------------------
QUANT_LIMITS = {
    # Max |logit difference| at the last position of a 700-token prompt, llama.cpp vs our fp32 model.
    # F32: the same weights; llama.cpp's kernels sum in another order (0.044 measured in a probe).
    "f32": 0.15,
    # F16: weights rounded to 11 significant bits (0.100 measured in a probe).
    "f16": 0.3,
}


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, chapter_data_path):
    out = tmp_path_factory.mktemp("gemma") / "run"
    result = run_cli("finetune", "--model", "gemma-3-270m", "--data", str(chapter_data_path), "--out", str(out),
                     "--max-steps", "3", "--mask-instructions", "--freeze-embedding", "--eval-every", "3",
                     "--eval-batches", "1", "--no-sample", "--lr", "1e-4")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def gemma_exports(gemma_run, tmp_path_factory):
    loaded = load_model(str(gemma_run))
    style = get_prompt_style("gemma")
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for quant in ("f32", "f16", "q8_0", "q4_k_m"):
        exported = export_model(loaded, style, "gguf", folder / quant, quant=quant)
        files[quant] = exported.files[0]
    return loaded, files


def _llama(path, **kwargs):
    return llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, verbose=False, **kwargs)


def _last_logits_llama(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)


def _long_prompt(tokenizer) -> list[int]:
    text = " ".join(record["output"] for record in prepare_data("builtin").loaded.records[:300])
    return tokenizer.encode(text)[:700]


def test_gguf_tokenization_equals_ours(gemma_exports, chapter_data_path):
    loaded, files = gemma_exports
    vocab = llama_cpp.Llama(str(files["f32"]), vocab_only=True, verbose=False)
    texts = corpus(chapter_data_path)
    assert len(texts) >= 200
    for text in texts:
        expected = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if text.startswith("<bos>"):  # llama.cpp adds a second BOS to a text that has one (and warns); we never do
            expected = expected[1:]
        assert expected == loaded.tokenizer.encode(text), text


def test_gguf_logits_agree_with_ours_for_every_quant(gemma_exports):
    loaded, files = gemma_exports
    ids = _long_prompt(loaded.tokenizer)
    assert len(ids) > 512  # past the sliding window
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0, -1].double().numpy()
    measured = {}
    for quant, path in files.items():
        theirs = _last_logits_llama(_llama(path, logits_all=True), ids)
        measured[quant] = float(np.abs(theirs - ours).max())
        if quant in QUANT_LIMITS:
            assert measured[quant] <= QUANT_LIMITS[quant], (quant, measured[quant])
        else:  # quantized weights: the same top-1 unless the top two are a near-tie in our logits
            top = np.argsort(-ours)[:2]
            assert np.argmax(theirs) == top[0] or ours[top[0]] - ours[top[1]] < 0.5, quant
    print(f"max |logit diff| on {len(ids)} tokens: {measured}")


def test_gguf_with_unshifted_norms_is_caught(gemma_run, tmp_path, monkeypatch):
    """Negative control: the comparison above fails for a GGUF whose norms lack llama.cpp's + 1."""
    from instructkit.models import families, weight_maps

    broken = dataclasses.replace(families.FAMILIES["gemma3"], to_gguf=lambda state, config: {
        name: (tensor - 1.0 if name.endswith("norm.weight") else tensor)
        for name, tensor in weight_maps.to_gguf(families.GEMMA3, state, config).items()})
    monkeypatch.setitem(families.FAMILIES, "gemma3", broken)
    loaded = load_model(str(gemma_run))
    path = export_model(loaded, get_prompt_style("gemma"), "gguf", tmp_path / "broken", quant="f32").files[0]
    ids = _long_prompt(loaded.tokenizer)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0, -1].double().numpy()
    assert np.abs(_last_logits_llama(_llama(path, logits_all=True), ids) - ours).max() > 10 * QUANT_LIMITS["f32"]


def test_gguf_chat_continuations_from_the_embedded_template_equal_ours(gemma_exports):
    """llama.cpp renders the chat itself from tokenizer.chat_template; greedy 32-token answers
    must equal ours for F32. The quantized files' agreement is measured and printed."""
    from instructkit.decode.generate import generate

    loaded, files = gemma_exports
    style = get_prompt_style("gemma")
    questions = ["Name a primary color.", "What is the capital of Italy?", "Give a synonym for 'happy'.",
                 "Translate 'cat' into Spanish.", "What is 2 plus 3?", "Write a short greeting.",
                 "Name a fruit that is yellow.", "What is the opposite of cold?", "List two planets.",
                 "Rewrite 'the dog barks' in the past tense."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    stops = style.stop_ids(loaded.tokenizer)
    ours = [r.text for r in generate(loaded.model, loaded.tokenizer, [loaded.tokenizer.encode(style.conversation(c))
                                                                       for c in chats], max_new_tokens=32, stop_ids=stops)]
    agreement = {}
    for quant, path in files.items():
        llm = _llama(path)
        theirs = [llm.create_chat_completion(messages=chat, temperature=0.0, max_tokens=32)["choices"][0]["message"]["content"]
                  for chat in chats]
        agreement[quant] = sum(a == b for a, b in zip(ours, theirs)) / len(chats)
        if quant == "f32":
            assert theirs == ours
    print(f"greedy 32-token chat answers equal to ours: {agreement}")


def test_gpt2_gguf_loads_and_tokenizes_like_tiktoken(tiny_runs, tmp_path, chapter_data_path):
    loaded = load_model(str(tiny_runs["tiny-gpt2"]))
    style = get_prompt_style("alpaca")
    texts = corpus(chapter_data_path)
    ids = loaded.tokenizer.encode(style.prompt(RECORDS[0]))
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0, -1].double().numpy()
    for quant, limit in (("f32", 1e-3), ("q8_0", None)):
        path = export_model(loaded, style, "gguf", tmp_path / quant, quant=quant).files[0]
        llm = _llama(path, logits_all=True)
        assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == \
            [loaded.tokenizer.encode(t) for t in texts]
        theirs = _last_logits_llama(llm, ids)
        if limit is not None:
            assert np.abs(theirs - ours).max() <= limit
        assert np.argmax(theirs) == np.argmax(ours) or np.sort(ours)[-1] - np.sort(ours)[-2] < 0.05

