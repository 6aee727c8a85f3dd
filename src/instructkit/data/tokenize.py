"""Records -> token ids and labels, tokenizing each example exactly once.

Each example is encoded as one string, prompt + output, followed by the end token. The
supervised positions come from the token span of the response, found with the character
offsets of the tokens (the first token that ends past the prompt starts the span). The prompt is tokenized on its own too, only to count the examples where it is not a
token prefix of the whole (generation sees the prompt alone, so such examples drift).

    input_ids: [bos?] prompt tokens | response tokens | end token       (T,)
    labels:    same ids where supervised, IGNORE_INDEX elsewhere        (T,)

Labels stay aligned with input_ids; the collate function does the one-position shift.
Default (the chapter): every token is a target. `mask_instructions` (exercise 7.2): only the
response and the end token. The end token is always a target, unless truncation removed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.models.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    response_start: int  # index of the first response token in input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        # labels[0] is never a target: nothing comes before it.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    @classmethod
    def from_token_ids(cls, token_ids: list[int], end_id: int) -> "EncodedExample":
        """An unmasked example from raw ids plus the end token (the chapter's toy batches)."""
        ids = [*token_ids, end_id]
        return cls(input_ids=ids, labels=list(ids), response_start=0)


@dataclass
class EncodingReport:
    examples: int = 0
    prompt_not_prefix: int = 0  # tokenized prompt differs from the start of the tokenized whole
    truncated: int = 0  # cut to max_length; each of these lost its end token
    nothing_supervised: int = 0  # after truncation, no target is left


def encode_example(
    record: dict,
    style: PromptStyle,
    tokenizer: Tokenizer,
    *,
    mask_instructions: bool = False,
) -> tuple[EncodedExample, bool]:
    """Encode one record. Returns the example and whether the prompt is a token prefix."""
    prompt = style.prompt(record)
    ids, ends = tokenizer.encode_with_offsets(prompt + record["output"])
    boundary = len(prompt)
    # The response starts at the first token that ends past the prompt (a token that straddles
    # the boundary carries response text, so it is supervised).
    response_start = next((i for i, end in enumerate(ends) if end > boundary), len(ids))
    prompt_ids = tokenizer.encode(prompt)
    is_prefix = ids[: len(prompt_ids)] == prompt_ids and response_start == len(prompt_ids)
    ids.append(style.end_token_id(tokenizer))
    if mask_instructions:
        labels = [IGNORE_INDEX] * response_start + ids[response_start:]
    else:
        labels = list(ids)
    return EncodedExample(input_ids=ids, labels=labels, response_start=response_start), is_prefix


def truncate_example(example: EncodedExample, max_length: int) -> EncodedExample:
    """Keep at most `max_length` training positions (inputs are ids[:-1], so max_length + 1 ids)."""
    keep = max_length + 1
    if len(example.input_ids) <= keep:
        return example
    return EncodedExample(
        input_ids=example.input_ids[:keep],
        labels=example.labels[:keep],
        response_start=min(example.response_start, keep),
    )


def encode_records(
    records: list[dict],
    style: PromptStyle,
    tokenizer: Tokenizer,
    *,
    mask_instructions: bool = False,
    max_length: int | None = None,
    max_untrainable_share: float = 0.05,
    source: str = "data",
) -> tuple[list[EncodedExample], EncodingReport]:
    """Encode a split; refuse if more than `max_untrainable_share` would train on nothing."""
    report = EncodingReport()
    examples: list[EncodedExample] = []
    for index, record in enumerate(records):
        for field in ("instruction", "input", "output"):
            control = tokenizer.find_control_token(record.get(field, ""))
            if control is not None:
                raise UserError(f"{source}: entry {index} (instruction {record['instruction'][:40]!r}): field '{field}' "
                                f"contains {control!r}, which the {tokenizer.name} tokenizer reads as a control token; "
                                "remove it from the data")
        example, is_prefix = encode_example(record, style, tokenizer, mask_instructions=mask_instructions)
        report.examples += 1
        report.prompt_not_prefix += not is_prefix
        if max_length is not None and len(example) > max_length + 1:
            # The end token is the last id, so any cut removes it: the model never sees this
            # example finish.
            example = truncate_example(example, max_length)
            report.truncated += 1
        if example.num_supervised == 0:
            report.nothing_supervised += 1
        examples.append(example)
    if report.examples and report.nothing_supervised / report.examples > max_untrainable_share:
        raise UserError(
            f"{source}: with --max-length {max_length}, {report.nothing_supervised} of {report.examples} "
            f"examples ({report.nothing_supervised / report.examples:.0%}) keep no supervised token "
            f"(limit {max_untrainable_share:.0%}); raise --max-length or shorten the prompts"
        )
    return examples, report
