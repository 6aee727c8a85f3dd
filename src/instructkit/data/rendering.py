"""How a conversation becomes text and supervised tokens: one `Renderer` for training, and the
same one for every prompt the model is later given.

A renderer is a prompt style (data/prompts.py) with its tokenizer: one of our named styles, or a
model's own chat template (data/chat_template.py) carried by the style. Both render with the same contract,
`render(messages, add_generation_prompt) -> str`, so the masking rule (chat_template.supervised_spans)
is one rule: an answer is the text its rendering adds after the generation prompt, up to and
including its end-of-turn token.

`encode_conversation` turns a record into token ids and labels:

    input_ids: [BOS, once] rendering tokens, control-token texts read as tokens      (T,)
    labels:    ids where a token overlaps an answer's span, IGNORE_INDEX elsewhere  (T,)
               (encode_conversations with `train_on="all"`: every id)
"""

from __future__ import annotations

from dataclasses import dataclass

from instructkit.data.chat_template import Supervision, supervised_spans
from instructkit.data.prompts import PromptStyle
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.errors import UserError
from instructkit.models.tokenizer import Tokenizer

TRAIN_ON = ("assistant", "all")


@dataclass(frozen=True)
class Renderer:
    """A prompt style (named, or a model's own template) with the tokenizer it renders for."""

    tokenizer: Tokenizer
    style: PromptStyle

    @property
    def name(self) -> str:
        return f"prompt style {self.style.name}"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # A style ends a user turn with its response header (the generation prompt) by itself.
        return self.style.render(messages, end_text=self.tokenizer.eos_text)

    def end_texts(self) -> frozenset[str]:
        """Texts that may end an answer: the tokenizer's control tokens (a template closes answers
        with one of them), its EOS texts and the style's end token."""
        texts = set(self.tokenizer.control_tokens) | {self.tokenizer.decode([i]) for i in self.tokenizer.eos_ids}
        texts.add(self.tokenizer.decode([self.style.end_token_id(self.tokenizer)]))
        return frozenset(texts)

    def supervision(self, messages: list[dict]) -> Supervision:
        return supervised_spans(lambda m, g: self.render(m, g), messages, self.end_texts(), origin=self.name)


@dataclass(frozen=True)
class EncodedConversation:
    examples: tuple[EncodedExample, ...]  # one, or one per answer when the template is not prefix-stable
    per_turn: bool
    header_mismatches: int


def encode_conversation(messages: list[dict], renderer: Renderer) -> EncodedConversation:
    """Render, tokenize once, and label the tokens that overlap an answer's span."""
    supervision = renderer.supervision(messages)
    examples = []
    for text, spans in supervision.texts:
        ids, ends = renderer.tokenizer.encode_rendered(text)
        starts = [0, *ends[:-1]]
        # A token is supervised when its characters overlap an answer's span. A token holding part of
        # a character (byte-level BPE) has start == end, inside the span when strictly within it.
        inside = [any(start < span_end and end > span_start for span_start, span_end in spans)
                  for start, end in zip(starts, ends)]
        labels = [token_id if supervised else IGNORE_INDEX for token_id, supervised in zip(ids, inside)]
        first = inside.index(True) if True in inside else len(ids)
        examples.append(EncodedExample(input_ids=ids, labels=labels, response_start=first))
    return EncodedConversation(tuple(examples), supervision.per_turn, supervision.header_mismatches)


@dataclass
class ConversationReport:
    """Mask coverage of a split: supervised tokens per record, truncation, and what was dropped."""

    records: int = 0
    examples: int = 0
    supervised: list[int] | None = None  # per record
    truncated: int = 0  # records cut to max_length
    skipped: int = 0  # records left with no supervised token (--skip-invalid)
    per_turn: int = 0  # records trained turn by turn (template not prefix-stable)
    header_mismatches: int = 0

    def coverage(self) -> dict:
        counts = sorted(self.supervised or [0])
        return {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]}


def encode_conversations(records: list[dict], renderer: Renderer, *, train_on: str = "assistant",
                         max_length: int | None = None, skip_invalid: bool = False,
                         source: str = "data") -> tuple[list[EncodedExample], ConversationReport]:
    """Every record (conversations, or Alpaca records as [user, assistant]) through `renderer`.
    A record that keeps no answer token (truncated away) is an error naming it; `skip_invalid`
    drops it and counts it. Coverage counts answer tokens, whatever `train_on` adds."""
    from instructkit.data.tokenize import truncate_example

    if train_on not in TRAIN_ON:
        raise UserError(f"--train-on {train_on!r}: choose from {', '.join(TRAIN_ON)}")
    report = ConversationReport(supervised=[])
    examples: list[EncodedExample] = []
    for index, record in enumerate(records):
        messages = record["messages"] if "messages" in record else _alpaca_conversation(record, renderer)
        for message in messages:
            control = renderer.tokenizer.find_control_token(message["content"])
            if control is not None:
                raise UserError(f"{source}: record {index}: a {message['role']} message contains {control!r}, which the "
                                f"{renderer.tokenizer.name} tokenizer reads as a control token; remove it from the data")
        encoded = encode_conversation(messages, renderer)
        kept = []
        for example in encoded.examples:
            if max_length is not None and len(example) > max_length + 1:
                example = truncate_example(example, max_length)
                report.truncated += 1
            kept.append(example)
        answer_tokens = sum(example.num_supervised for example in kept)
        if answer_tokens == 0:
            if not skip_invalid:
                limit = f" within --max-length {max_length}" if max_length else ""
                raise UserError(f"{source}: record {index}: no answer token is left to train on{limit}; raise "
                                "--max-length, shorten the record, or pass --skip-invalid to drop such records")
            report.skipped += 1
            continue
        if train_on == "all":
            kept = [EncodedExample(e.input_ids, list(e.input_ids), e.response_start) for e in kept]
        report.records += 1
        report.examples += len(kept)
        report.supervised.append(answer_tokens)
        report.per_turn += encoded.per_turn
        report.header_mismatches += encoded.header_mismatches
        examples.extend(kept)
    return examples, report


def _alpaca_conversation(record: dict, renderer: Renderer) -> list[dict]:
    """An Alpaca record as [user, assistant]: with a named style, the user turn is the style's own
    (instruction, its input prefix, the input), so the rendering equals `style.prompt(record)`."""
    from instructkit.data.conversations import alpaca_messages

    if renderer.style is not None:
        return [{"role": "user", "content": renderer.style.user_content(record)},
                {"role": "assistant", "content": record["output"]}]
    return alpaca_messages(record)


def marked_text(example: EncodedExample, tokenizer) -> str:
    """An example's text as the model reads it, its supervised tokens inside [[ ]] (a target at
    position i is token i: labels here are aligned with input_ids)."""
    from instructkit.data.tokenize import IGNORE_INDEX

    text, inside = [], False
    for token_id, label in zip(example.input_ids, example.labels):
        if (label != IGNORE_INDEX) != inside:
            text.append("]]" if inside else "[[")
            inside = not inside
        text.append(tokenizer.decode([token_id]))
    return "".join(text) + ("]]" if inside else "")
