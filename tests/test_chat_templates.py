"""Models' own chat templates (data/chat_template.py) against transformers' `apply_chat_template`,
and the supervised spans that training reads from a rendering.

The templates: the eight real-world ones in ../shared/data/chat-templates/ (read from there) and
SmolLM2-135M-Instruct's own, from inside its GGUF. The conversations: 64 made here, with and without
a system prompt, 1-4 turns, unicode, empty strings, whitespace the templates trim, Jinja syntax as
text; rendered with and without the generation prompt. transformers is the reference: the same
bytes, or the same error; llama.cpp's Jinja renderer (llama-cpp-python) gives the same prompts."""

from __future__ import annotations

import itertools
import pytest

from instructkit.data.chat_template import ChatTemplate, supervised_spans
from instructkit.errors import UserError

from .conftest import SHARED_DATA

TEMPLATES = SHARED_DATA / "chat-templates"
NAMES = ["llama-3-instruct", "qwen2.5-instruct", "mistral-instruct", "phi-3", "gemma-it", "chatml", "zephyr", "alpaca"]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
TEXTS = ["Hello", "What is 2 + 2?", "  padded  ", "", "Ünïcödé ✓ 日本語 🙂", "line one\nline two\n\n",
         "{{ not a template }} {% raw %}", "Sort these: 3, 1, 2.", "Now only the first two."]
ANSWERS = ["Hi there!", "4", "", "  spaced answer ", "1, 2, 3", "日本語で答えます。", "Sure.\n\n- a\n- b"]
SYSTEMS = [None, "You are a helpful assistant.", "", "  Be brief.  "]


def conversations() -> list[list[dict]]:
    """64 conversations: every system prompt choice with 1-4 user turns, ending on a user or an
    assistant message, contents cycled."""
    users, answers = itertools.cycle(TEXTS), itertools.cycle(ANSWERS)
    made = []
    for turns, system in itertools.product(range(1, 5), SYSTEMS):
        for ending in ("user", "assistant", "user", "assistant"):
            messages = [{"role": "system", "content": system}] if system is not None else []
            for turn in range(turns):
                messages.append({"role": "user", "content": next(users)})
                if turn < turns - 1 or ending == "assistant":
                    messages.append({"role": "assistant", "content": next(answers)})
            made.append(messages)
    return made


CONVERSATIONS = conversations()


def _reference_tokenizer(template: str):
    """A transformers tokenizer with only what apply_chat_template(tokenize=False) reads: the template
    and the special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({text: i for i, text in enumerate(SPECIAL.values())}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **SPECIAL)


def _template_sources() -> dict[str, str]:
    """Each file as it is, and as the collection's README says to use it: indentation and line
    breaks removed (their line breaks are layout; the texts' own are written \\n). Qwen2.5's file
    controls its whitespace with {%- -%} and holds literal line breaks in its strings: kept as is."""
    from instructkit.models.gguf_convert import read_gguf
    from instructkit.models.packaged import smollm2_gguf_path

    sources = {}
    for name in NAMES:
        text = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        sources[f"{name} (file)"] = text
        sources[name] = text if name == "qwen2.5-instruct" else text.replace("    ", "").replace("\n", "")
    sources["smollm2 (its GGUF)"] = read_gguf(smollm2_gguf_path()).fields["tokenizer.chat_template"].value
    return sources


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    if not TEMPLATES.is_dir():
        pytest.fail(f"{TEMPLATES} is missing: the tests read the shared chat templates from there")
    return _template_sources()


def test_the_fixture_has_50_plus_varied_conversations():
    assert len(CONVERSATIONS) >= 50
    assert {len([m for m in c if m["role"] == "user"]) for c in CONVERSATIONS} == {1, 2, 3, 4}
    assert any(c[0]["role"] == "system" for c in CONVERSATIONS) and any(c[0]["role"] != "system" for c in CONVERSATIONS)


@pytest.mark.parametrize("name", [*NAMES, *[f"{name} (file)" for name in NAMES if name != "qwen2.5-instruct"],
                                  "smollm2 (its GGUF)"])
def test_renders_are_byte_identical_to_apply_chat_template(sources, name):
    reference = _reference_tokenizer(sources[name])
    ours = ChatTemplate(sources[name], tuple(sorted(SPECIAL.items())), origin=name)
    compared = 0
    for messages, generation in itertools.product(CONVERSATIONS, (False, True)):
        try:
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # the template refuses (a system prompt it cannot place, say): so must we
            with pytest.raises(UserError):
                ours.render(messages, add_generation_prompt=generation)
            assert "jinja" in type(exc).__module__ or "Template" in type(exc).__name__, exc
            continue
        assert ours.render(messages, add_generation_prompt=generation) == expected, (name, messages, generation)
        compared += 1
    assert compared >= 100, compared  # most of the 128 renders are accepted by every template


@pytest.mark.parametrize("name", [*NAMES, "smollm2 (its GGUF)"])
def test_llama_cpps_jinja_renderer_gives_the_same_prompts(sources, name):
    """llama.cpp's side (llama-cpp-python's Jinja2ChatFormatter, what it uses for a GGUF's own
    tokenizer.chat_template) renders every prompt our training and serving render."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    theirs = Jinja2ChatFormatter(sources[name], eos_token=SPECIAL["eos_token"], bos_token=SPECIAL["bos_token"])
    ours = ChatTemplate(sources[name], tuple(sorted(SPECIAL.items())), origin=name)
    compared = 0
    for messages in CONVERSATIONS:
        if messages[-1]["role"] != "user":
            continue  # llama.cpp renders prompts: always with the generation prompt
        try:
            expected = theirs(messages=messages).prompt
        except Exception:  # the template refuses: so must we
            with pytest.raises(UserError):
                ours.render(messages, add_generation_prompt=True)
            continue
        assert ours.render(messages, add_generation_prompt=True) == expected, (name, messages)
        compared += 1
    assert compared >= 24, compared


def test_tools_reach_the_template_as_transformers_passes_them(sources):
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                                "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    reference = _reference_tokenizer(sources["qwen2.5-instruct"])
    ours = ChatTemplate(sources["qwen2.5-instruct"], tuple(sorted(SPECIAL.items())))
    for messages in CONVERSATIONS[:8]:
        expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages, add_generation_prompt=True, tools=tools) == expected
        assert '"name": "add"' in expected


def test_the_sandbox_hides_what_transformers_hides():
    """A template is untrusted code from the Hub: no attribute escapes, no underscore namespace keys;
    where transformers raises, we raise (one line); where it renders nothing, so do we."""
    messages = [{"role": "user", "content": "x"}]
    for source in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}{{ ns }}", "[{{ ''.__class__ }}]",
                   "{{ raise_exception('no system prompt, please') }}"):
        try:
            expected = _reference_tokenizer(source).apply_chat_template(messages, tokenize=False)
        except Exception:
            with pytest.raises(UserError):
                ChatTemplate(source).render(messages)
            continue
        assert ChatTemplate(source).render(messages) == expected == "[]"
    with pytest.raises(UserError, match="line 1"):
        ChatTemplate("{% for x in %}").render([])


# Supervision ---------------------------------------------------------------------------------------
END_TOKENS = frozenset({"</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"})


def _spans(source: str, messages: list[dict]):
    template = ChatTemplate(source, tuple(sorted(SPECIAL.items())))
    return template, supervised_spans(lambda m, g: template.render(m, add_generation_prompt=g), messages, END_TOKENS)


@pytest.mark.parametrize("name", [*NAMES, "smollm2 (its GGUF)"])
def test_every_answer_and_its_end_token_are_supervised_and_nothing_else(sources, name):
    """Each answer's text and its end-of-turn token lie inside a supervised span; user and system
    text and the generation prompt never do; the text is the whole rendering up to the last span."""
    for messages in CONVERSATIONS:
        if messages[-1]["role"] != "assistant" or any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
            continue
        template, supervision = _spans(sources[name], messages)
        assert not supervision.per_turn and supervision.header_mismatches == 0
        ((text, spans),) = supervision.texts
        whole = template.render(messages)
        assert whole.startswith(text) and whole[len(text):].strip() == ""
        answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        assert len(spans) == len(answers)
        for (start, end), answer in zip(spans, answers):
            supervised = text[start:end]
            assert answer in supervised and any(supervised.endswith(token) for token in END_TOKENS), (name, supervised)
            assert "user" not in supervised.replace(answer, "") and "[INST]" not in supervised, (name, supervised)


def test_a_template_that_drops_earlier_reasoning_trains_turn_by_turn():
    """Qwen3's official template drops earlier answers' reasoning once a later user turn exists (not
    prefix-stable). A template of ours with that behaviour: each answer becomes its own example,
    rendered as the model saw it when it answered, supervising that answer alone."""
    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
              "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1].strip() }}"
              "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "<think>add again</think>6"}]
    template, supervision = _spans(source, messages)
    assert supervision.per_turn and len(supervision.texts) == 2
    (first, (first_span,)), (second, (second_span,)) = supervision.texts
    assert first[first_span[0]:first_span[1]] == "<think>add</think>4<|im_end|>"
    assert "<think>add</think>" not in second  # the first answer as the second turn's model saw it
    assert second[second_span[0]:second_span[1]] == "<think>add again</think>6<|im_end|>"
    assert second == template.render(messages)[: len(second)]


def test_a_generation_prompt_with_a_stray_newline_is_counted_not_hidden(sources):
    """chatml.jinja as the file has it renders "<|im_start|>assistant\\n" plus a layout newline as
    the generation prompt, but the answer right after "assistant\\n": trained as rendered, counted."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    _, supervision = _spans(sources["chatml (file)"], messages)
    ((text, ((start, end),)),) = supervision.texts
    assert supervision.header_mismatches == 1 and text[start:end] == "Hi<|im_end|>"


def test_a_template_without_an_end_token_is_refused_by_name():
    source = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    template = ChatTemplate(source, origin="my-template.jinja")
    with pytest.raises(UserError, match="my-template.jinja: renders no end-of-turn token"):
        supervised_spans(lambda m, g: template.render(m, add_generation_prompt=g),
                         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], END_TOKENS,
                         origin="my-template.jinja")

