"""A model's own chat template (Jinja, from tokenizer_config.json or a GGUF's
`tokenizer.chat_template`), rendered the way transformers' `apply_chat_template` renders it, and the
character spans of a rendered conversation that training supervises.

Rendering: Jinja's immutable sandbox with transformers' settings (trim_blocks, lstrip_blocks, the
loop-control extension) and globals (`raise_exception`, `strftime_now`, `tojson` without HTML
escaping, a `dict` and a `namespace` that refuses underscore names); the template sees `messages`,
`add_generation_prompt`, the tokenizer's special-token texts (`bos_token`, `eos_token`, `pad_token`,
`unk_token`) and any extra variables. `{% generation %}` blocks render their body (the mask comes
from rendering, below, not from those markers, which few templates have).

Supervision (`supervised_spans`): for each assistant message k, the conversation is rendered up to
it with the generation prompt (what the model sees when it must answer: `before`) and through it
(`through`). When `before` is a prefix of `through` and `through` of the whole rendering, the
answer is `through[len(before):]` in place (a `before` that ends in whitespace `through` lacks, a
formatting slip several published templates have, is counted in `header_mismatches` and the answer
starts after their common part; any other difference is refused); it is supervised up to and including its last special
token (the end-of-turn token: <|im_end|>, <|eot_id|>, </s>, <end_of_turn> ...), and the template's
text after that (a newline) is not. A template that renders no special token after an answer
would train a model that never stops: refused, naming the template.

Not prefix-stable: some templates render earlier turns differently once later turns exist (Qwen3
drops earlier answers' reasoning; some move the system prompt). Then one rendering cannot hold every
answer as the model saw it, so each assistant turn becomes an example of its own: the conversation
rendered through that turn, supervising only that turn (`per_turn=True` in the result).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from instructkit.errors import UserError


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                               dict=lambda *args, **kwargs: dict(*args, **kwargs), namespace=Namespace)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"chat template: Jinja syntax error on line {exc.lineno}: {exc.message}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token texts it is rendered with."""

    source: str
    special: tuple[tuple[str, str], ...] = ()  # (("bos_token", "<s>"), ("eos_token", "</s>"), ...)
    origin: str = "chat template"  # where it came from, for error messages

    @classmethod
    def for_tokenizer(cls, source: str, tokenizer, origin: str = "chat template") -> "ChatTemplate":
        """The template with `tokenizer`'s BOS / EOS / pad texts, as transformers passes them."""
        names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
        texts = {name: tokenizer.decode([token_id]) for name, token_id in names.items() if token_id is not None}
        return cls(source=source, special=tuple(sorted(texts.items())), origin=origin)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, **variables) -> str:
        import jinja2

        context = {**dict(self.special), **variables}
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise UserError(f"{self.origin}: {exc}") from None


@dataclass(frozen=True)
class Supervision:
    """What one conversation trains on: each rendered text with its supervised character spans.
    One text when the template is prefix-stable; one per assistant turn when it is not."""

    texts: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    per_turn: bool
    # Answers whose generation prompt ends in whitespace the answer's own rendering lacks (a template
    # formatting slip, e.g. a newline after `<|im_start|>assistant\n`): trained as rendered, but
    # the model's prompt at inference differs from what it saw there by that whitespace.
    header_mismatches: int = 0


def _answer_start(before: str, through: str, origin: str) -> int:
    """Where the answer starts in `through`: after `before` (the generation prompt), or, where the
    prompt ends in whitespace that `through` lacks, after their common part."""
    if through.startswith(before):
        return len(before)
    stem = before.rstrip()
    common = len(os.path.commonprefix([before, through]))
    if through.startswith(stem) and common >= len(stem):
        return common
    raise UserError(f"{origin}: the generation prompt is not how the template renders the start of an answer "
                    f"(prompt ends {before[-30:]!r}, the answer's rendering has {through[common - 10:common + 20]!r}); "
                    "a model trained on it would be prompted differently than it learned")


def _answer_span(start: int, through: str, specials: frozenset[str], origin: str) -> tuple[int, int]:
    """The supervised part of `through[start:]`: up to and including its last special token."""
    answer = through[start:]
    last_end = max((answer.rfind(token) + len(token) for token in specials if token and token in answer), default=-1)
    if last_end <= 0:
        raise UserError(f"{origin}: renders no end-of-turn token after an assistant message "
                        f"(it renders {answer[-40:]!r}); a model trained on it would never stop. "
                        "Use a template that closes each answer with a special token, or --prompt-style NAME")
    return start, start + last_end


def supervised_spans(render, messages: list[dict], specials: frozenset[str], origin: str = "chat template") -> Supervision:
    """`render(messages, add_generation_prompt)` -> text. Spans of every assistant answer; see the
    module's docstring for the rule and the not-prefix-stable case."""
    answers = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    whole = render(messages, False)
    spans, stable, mismatches = [], True, 0
    pieces = []
    for index in answers:
        before, through = render(messages[:index], True), render(messages[: index + 1], False)
        start = _answer_start(before, through, origin)
        mismatches += start != len(before)
        span = _answer_span(start, through, specials, origin)
        pieces.append((through, span))
        stable = stable and whole.startswith(through)
        spans.append(span)
    if not answers:
        return Supervision(texts=(), per_turn=False)
    if stable:
        # Nothing after the last supervised token is read by a causal model's loss: cut it.
        return Supervision(texts=((whole[: spans[-1][1]], tuple(spans)),), per_turn=False, header_mismatches=mismatches)
    return Supervision(texts=tuple((text[:span[1]], (span,)) for text, span in pieces), per_turn=True,
                       header_mismatches=mismatches)
