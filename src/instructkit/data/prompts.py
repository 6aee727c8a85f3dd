"""Prompt styles: how a record becomes the text a model reads.

A style is a plain value (four strings and a name), saved as JSON in every run folder, and the
one definition used by training, generation, response extraction, the judge and export.

    prompt(record) = instruction_prefix + instruction
                     [+ input_prefix + input, only when input is non-empty]
                     + response_prefix
    training text  = prompt(record) + output, followed by the end token

`alpaca` is byte-identical to the chapter's `format_input` plus "\\n\\n### Response:\\n";
`phi3` is the chapter's exercise 7.1 format; `gemma` uses Gemma's own turn markers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from instructkit.errors import UserError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    instruction_prefix: str
    input_prefix: str
    response_prefix: str
    # Text of a special token that ends a response (e.g. "<end_of_turn>"); None means the
    # tokenizer's own end-of-sequence token.
    end_marker: str | None = None

    def format_input(self, record: dict) -> str:
        """Instruction and input, without the response header (the chapter's `format_input`)."""
        text = self.instruction_prefix + record["instruction"]
        if record.get("input"):
            text += self.input_prefix + record["input"]
        return text

    def prompt(self, record: dict) -> str:
        """Everything the model sees before it starts answering."""
        return self.format_input(record) + self.response_prefix

    def training_text(self, record: dict) -> str:
        return self.prompt(record) + record["output"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> "PromptStyle":
        try:
            return cls(**value)
        except TypeError as exc:
            raise UserError(f"invalid prompt style definition: {exc}") from None


ALPACA = PromptStyle(
    name="alpaca",
    instruction_prefix=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\n"
    ),
    input_prefix="\n\n### Input:\n",
    response_prefix="\n\n### Response:\n",
)

PHI3 = PromptStyle(
    name="phi3",
    instruction_prefix="<|user|>\n",
    input_prefix="\n",
    response_prefix="\n<|assistant|>:\n",
)

GEMMA = PromptStyle(
    name="gemma",
    instruction_prefix="<start_of_turn>user\n",
    input_prefix="\n\n",
    response_prefix="<end_of_turn>\n<start_of_turn>model\n",
    end_marker="<end_of_turn>",
)

PROMPT_STYLES: dict[str, PromptStyle] = {style.name: style for style in (ALPACA, PHI3, GEMMA)}


def get_prompt_style(name: str) -> PromptStyle:
    try:
        return PROMPT_STYLES[name]
    except KeyError:
        raise UserError(f"unknown prompt style {name!r} (choose from: {', '.join(PROMPT_STYLES)})") from None
