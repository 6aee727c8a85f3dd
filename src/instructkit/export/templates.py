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

from instructkit.data.prompts import PromptStyle


def _jinja_literal(text: str) -> str:
    # JSON's escapes (\\n, \\", \\\\, \\uXXXX) are valid in Jinja's Python-like string literals.
    return json.dumps(text, ensure_ascii=False)


def jinja_chat_template(style: PromptStyle, *, bos: bool) -> str:
    """A Hugging Face / llama.cpp chat template. `bos`: start with {{ bos_token }} (Gemma), because
    transformers' apply_chat_template(tokenize=True) adds no special tokens itself."""
    first_turn = "true" if style.system_in_first_turn else "false"
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
        f"    {{{{ {_jinja_literal(style.response_prefix)} }}}}{{{{ message['content'] }}}}{{{{ {_jinja_literal(style.turn_separator)} }}}}\n"
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


def go_template(style: PromptStyle) -> str:
    """Ollama's TEMPLATE: renders .Messages (with .System as the system message when the
    messages carry none) by the same rule, ending with the response prefix."""
    first_turn = "true" if style.system_in_first_turn else "false"
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
        f"{{{{ .Content }}}}{{{{ {_go_literal(style.turn_separator)} }}}}\n"
        "{{- end }}\n"
        "{{- end }}"
    )
