"""The prompt style as the templates other tools read: a Jinja chat template (transformers'
`apply_chat_template`, llama.cpp's GGUF `tokenizer.chat_template`) and a Go text/template
(Ollama's Modelfile TEMPLATE). Both are generated from PromptStyle's one conversation rule
(data/prompts.py), so each renders exactly what our engine feeds the model:

    [system + "\\n\\n", when the style puts it first]
    for each user message:      instruction_prefix [+ system + "\\n\\n", first turn, when the style puts it there] + content
    for each assistant message: response_prefix + content + turn_separator
    at the end, to answer:      response_prefix

A style's strings are written into the templates as escaped string literals, never spliced in
as template syntax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError


def _jinja_literal(text: str) -> str:
    # JSON's escapes (\\n, \\", \\\\, \\uXXXX) are valid in Jinja's Python-like string literals.
    return json.dumps(text, ensure_ascii=False)


def jinja_chat_template(style: PromptStyle, *, bos: bool) -> str:
    """A Hugging Face / llama.cpp chat template. `bos`: start with {{ bos_token }} (Gemma), because
    transformers' apply_chat_template(tokenize=True) adds no special tokens itself. A style that is
    a model's own template (`--prompt-style model`) is that template, verbatim."""
    if style.chat_template is not None:
        return style.chat_template
    first_turn = "true" if style.system_in_first_turn else "false"
    closing = "{{ eos_token }}" if style.end_marker is None else ""  # as training closes answers (PromptStyle.render)
    return (
        ("{{- bos_token -}}\n" if bos else "")
        + "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "  {%- set system = messages[0]['content'] -%}\n"
        "  {%- set turns = messages[1:] -%}\n"
        "{%- else -%}\n"
        "  {%- set system = '' -%}\n"
        "  {%- set turns = messages -%}\n"
        "{%- endif -%}\n"
        f"{{%- set system_in_first_turn = {first_turn} -%}}\n"
        f"{{%- set system_prefix = {_jinja_literal(style.system_prefix)} -%}}\n"
        f"{{%- set system_suffix = {_jinja_literal(style.system_suffix)} -%}}\n"
        "{%- if system and not system_in_first_turn -%}{{ system_prefix + system + system_suffix }}{%- endif -%}\n"
        "{%- for message in turns -%}\n"
        "  {%- if message['role'] == 'user' -%}\n"
        f"    {{{{ {_jinja_literal(style.instruction_prefix)} }}}}\n"
        "    {%- if loop.first and system and system_in_first_turn -%}{{ system_prefix + system + system_suffix }}{%- endif -%}\n"
        "    {{ message['content'] }}\n"
        "  {%- elif message['role'] == 'assistant' -%}\n"
        f"    {{{{ {_jinja_literal(style.response_prefix)} }}}}{{{{ message['content'] }}}}{closing}{{{{ {_jinja_literal(style.turn_separator)} }}}}\n"
        "  {%- else -%}\n"
        "    {{ raise_exception('roles must be system (first), user or assistant') }}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{ {_jinja_literal(style.response_prefix)} }}}}{{%- endif -%}}\n"
    )


def _go_literal(text: str) -> str:
    # Go's interpreted string literals take JSON's escapes, except that JSON may write "\\u003c"
    # style escapes Go also accepts; "/" is never escaped by json.dumps.
    return json.dumps(text, ensure_ascii=False)


def go_template(style: PromptStyle, eos_text: str = "") -> str:
    """Ollama's TEMPLATE: renders .Messages (with .System as the system message when the
    messages carry none) by the same rule, ending with the response prefix; each answer is closed
    by `eos_text` (the tokenizer's EOS, which Ollama reads as that token) in a style without an
    end marker, as training closes it."""
    if style.chat_template is not None:
        return _go_from_chat_template(style)
    first_turn = "true" if style.system_in_first_turn else "false"
    closing = _go_literal(eos_text if style.end_marker is None else "")
    return (
        "{{- $system := .System }}\n"
        "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}{{ end }}\n"
        f"{{{{- $inFirst := {first_turn} }}}}\n"
        "{{- $first := true }}\n"
        "{{- if and $system (not $inFirst) }}"
        f"{{{{ {_go_literal(style.system_prefix)} }}}}{{{{ $system }}}}{{{{ {_go_literal(style.system_suffix)} }}}}{{{{ end }}}}\n"
        "{{- range .Messages }}\n"
        "{{- if eq .Role \"user\" }}"
        f"{{{{ {_go_literal(style.instruction_prefix)} }}}}"
        "{{ if and $first $system $inFirst }}"
        f"{{{{ {_go_literal(style.system_prefix)} }}}}{{{{ $system }}}}{{{{ {_go_literal(style.system_suffix)} }}}}{{{{ end }}}}{{{{ .Content }}}}"
        f"{{{{ {_go_literal(style.response_prefix)} }}}}"
        "{{ $first = false }}\n"
        "{{- else if eq .Role \"assistant\" }}"
        f"{{{{ .Content }}}}{{{{ {closing} }}}}{{{{ {_go_literal(style.turn_separator)} }}}}\n"
        "{{- end }}\n"
        "{{- end }}"
    )


# A model's own chat template, for Ollama ------------------------------------------------------------
# Ollama renders a Go text/template, not Jinja. Most chat templates wrap each message in fixed text
# by its role; such a template is read off renderings of marked messages (the text around each mark)
# and written as a Go template of the same shape, then checked: for a set of probe conversations the
# Go template's output (emulated here, by the same pieces; the tests run Go itself) must equal the
# Jinja rendering byte for byte. A template with logic that shape cannot hold (text that depends on
# a message's content, trimming, a system prompt merged into a message) is refused in one line.
_MARK = "\ue000"


@dataclass(frozen=True)
class _RolePieces:
    start: str  # before the first user message when there is no system message (BOS, a default system turn)
    system_before: str  # with a system message: the text before its content ...
    system_after: str  # ... and after it, up to the first user message's content
    user_before: str
    user_after: str
    assistant_before: str
    assistant_after: str
    generation: str  # the generation prompt, after a final user message


def _split_at(text: str, mark: str, origin: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise UserError(f"{origin}: a message's text does not appear exactly once where the message is rendered; "
                        "its Ollama template cannot be made role by role (export --format gguf or hf instead)")
    before, _, after = text.partition(mark)
    return before, after


def _role_pieces(style: PromptStyle) -> _RolePieces:
    origin = f"the {style.name} chat template"
    template = style._template()

    def render(*turns: tuple[str, str], generation: bool = False) -> str:
        return template.render([{"role": role, "content": text} for role, text in turns], add_generation_prompt=generation)

    u1, a1, u2, s1 = (f"{_MARK}{name}{_MARK}" for name in ("u1", "a1", "u2", "s1"))
    one, two, three = render(("user", u1)), render(("user", u1), ("assistant", a1)), render(("user", u1), ("assistant", a1), ("user", u2))
    asked = render(("user", u1), generation=True)
    if not (asked.startswith(one) and two.startswith(one) and three.startswith(two)):
        raise UserError(f"{origin}: renders earlier messages differently once later ones exist; its Ollama template "
                        "cannot be made role by role (export --format gguf or hf instead)")
    head, user_after = _split_at(one, u1, origin)
    assistant_before, assistant_after = _split_at(two[len(one):], a1, origin)
    user_before, second_after = _split_at(three[len(two):], u2, origin)
    if second_after != user_after or not head.endswith(user_before):
        raise UserError(f"{origin}: wraps the first user message differently from later ones; its Ollama template "
                        "cannot be made role by role (export --format gguf or hf instead)")
    system_head, system_tail = _split_at(render(("system", s1), ("user", u1)), u1, origin)
    system_before, system_after = _split_at(system_head, s1, origin)
    if system_tail != user_after:
        raise UserError(f"{origin}: a system message changes how the first user message ends; its Ollama template "
                        "cannot be made role by role (export --format gguf or hf instead)")
    return _RolePieces(start=head[: len(head) - len(user_before)], system_before=system_before, system_after=system_after,
                       user_before=user_before, user_after=user_after, assistant_before=assistant_before,
                       assistant_after=assistant_after, generation=asked[len(one):])


def _emulate(pieces: _RolePieces, messages: list[dict]) -> str:
    """What the Go template made from `pieces` renders for `messages` (a system message first or none)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    text, first = "", True
    for message in messages:
        if message["role"] == "user":
            if first:
                text += (pieces.system_before + system + pieces.system_after) if system else (pieces.start + pieces.user_before)
            else:
                text += pieces.user_before
            text += message["content"] + pieces.user_after
            first = False
        elif message["role"] == "assistant":
            text += pieces.assistant_before + message["content"] + pieces.assistant_after
    return text + (pieces.generation if messages and messages[-1]["role"] == "user" else "")


PROBES = [["Hello"], ["Sort these: 3, 1, 2", "1, 2, 3", "Now only the first two."], ["  padded text  ", "an answer\n"],
          ["line one\nline two", "", "Ünïcödé 🙂"], ["What is 2+2?", "4", "And 3+3?", "6"]]


def _go_from_chat_template(style: PromptStyle) -> str:
    pieces = _role_pieces(style)
    template = style._template()
    for texts, system in ((texts, system) for texts in PROBES for system in (None, "Be brief.")):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]
        expected = template.render(messages, add_generation_prompt=messages[-1]["role"] == "user")
        if _emulate(pieces, messages) != expected:
            construct = "it trims message text (| trim)" if any(t != t.strip() for t in texts) else \
                "its text depends on the messages' content or position"
            raise UserError(f"the {style.name} chat template cannot be written as Ollama's Go template: {construct} "
                            f"(conversation {texts!r} renders differently); export --format gguf or hf instead")
    go = _go_literal
    return (
        "{{- $system := .System }}\n"
        "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}{{ end }}\n"
        "{{- $first := true }}{{ $last := \"\" }}\n"
        "{{- range .Messages }}\n"
        "{{- if eq .Role \"user\" }}"
        f"{{{{ if $first }}}}{{{{ if $system }}}}{{{{ {go(pieces.system_before)} }}}}{{{{ $system }}}}{{{{ {go(pieces.system_after)} }}}}"
        f"{{{{ else }}}}{{{{ {go(pieces.start + pieces.user_before)} }}}}{{{{ end }}}}"
        f"{{{{ else }}}}{{{{ {go(pieces.user_before)} }}}}{{{{ end }}}}"
        f"{{{{ .Content }}}}{{{{ {go(pieces.user_after)} }}}}{{{{ $first = false }}}}{{{{ $last = .Role }}}}\n"
        "{{- else if eq .Role \"assistant\" }}"
        f"{{{{ {go(pieces.assistant_before)} }}}}{{{{ .Content }}}}{{{{ {go(pieces.assistant_after)} }}}}{{{{ $last = .Role }}}}\n"
        "{{- end }}\n"
        "{{- end }}"
        f"{{{{ if eq $last \"user\" }}}}{{{{ {go(pieces.generation)} }}}}{{{{ end }}}}"
    )
