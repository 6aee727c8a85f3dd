"""Prompt styles: how a record becomes the text a model reads.

A style is a plain value (four strings and a name), saved as JSON in every run folder, and the
one definition used by training, generation, response extraction, the judge and export.

    prompt(record) = instruction_prefix + instruction
                     [+ input_prefix + input, only when input is non-empty]
                     + response_prefix
    training text  = prompt(record) + output, followed by the end token

`alpaca` is byte-identical to the chapter's `format_input` plus "\\n\\n### Response:\\n";
`phi3` is the chapter's exercise 7.1 format; `gemma` uses Gemma's own turn markers.

A conversation (system, user and assistant messages; chat, serving, few-shot prompts and the
templates that export writes) follows one rule, so a single user message renders exactly as
`prompt` does for a record whose instruction is that message:

    conversation = [system + "\\n\\n", unless the style puts it in the first turn]
                   for each exchange: prompt({"instruction": user}) + assistant + turn_separator
                   ... ending with prompt({"instruction": last user message})

The system message stands before everything (alpaca, phi3) or, as Gemma's own template does,
opens the first user message followed by a blank line. `turn_separator` closes an answer:
Gemma's "<end_of_turn>\\n"; a blank line for alpaca and phi3, whose answers end with the
tokenizer's end-of-sequence token when trained, which a prompt cannot hold as text.
A record with an input is the user message `user_content(record)`: the instruction, the input
prefix and the input, so `prompt(record) == conversation([user_content(record)])`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from instructkit.errors import UserError

if TYPE_CHECKING:
    from instructkit.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptStyle:
    name: str
    instruction_prefix: str
    input_prefix: str
    response_prefix: str
    # Text of a special token that ends a response (e.g. "<end_of_turn>"); None means the
    # tokenizer's own end-of-sequence token.
    end_marker: str | None = None
    # What follows an assistant message before the next user turn, in a conversation.
    turn_separator: str = "\n\n"
    # Where a system message goes: inside the first user turn (Gemma) or before everything.
    system_in_first_turn: bool = False
    # What surrounds a system message's text (ChatML gives it a turn of its own).
    system_prefix: str = ""
    system_suffix: str = "\n\n"
    # Text that ends an answer when a model goes on with another turn instead of its end token
    # (chat, serving, and the stop lists that export writes for llama.cpp and Ollama).
    stop_strings: tuple[str, ...] = ()
    # A model's own chat template (Jinja) and the special-token texts it renders with: when set, it
    # renders every prompt and conversation (`model_style` builds such a style).
    chat_template: str | None = None
    template_tokens: tuple[tuple[str, str], ...] = ()

    def _template(self):
        from instructkit.data.chat_template import ChatTemplate

        return ChatTemplate(self.chat_template, self.template_tokens, origin=f"the {self.name} chat template")

    def format_input(self, record: dict) -> str:
        """Instruction and input, without the response header (the chapter's `format_input`)."""
        text = self.instruction_prefix + record["instruction"]
        if record.get("input"):
            text += self.input_prefix + record["input"]
        return text

    def prompt(self, record: dict) -> str:
        """Everything the model sees before it starts answering."""
        if self.chat_template is not None:
            return self.conversation([{"role": "user", "content": self.user_content(record)}])
        return self.format_input(record) + self.response_prefix

    def prompt_of(self, record: dict, end_text: str = "") -> str:
        """The prompt for a record's (last) answer: `prompt` for an Alpaca record; for a
        conversation, the messages before its last assistant message, rendered to be answered
        (earlier answers closed by `end_text`, as in `conversation`)."""
        if "messages" not in record:
            return self.prompt(record)
        messages = record["messages"]
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        return self.conversation(messages[:last], end_text)

    def prompt_ids(self, record: dict, tokenizer: Tokenizer) -> list[int]:
        """Ids of `prompt_of(record)` for a model trained with `tokenizer`: earlier answers closed
        by its EOS as in training, control-token texts read as tokens."""
        return tokenizer.encode_prompt(self.prompt_of(record, tokenizer.eos_text))

    def user_content(self, record: dict) -> str:
        """The record as one user message (instruction, and the input under its prefix)."""
        return self.format_input(record)[len(self.instruction_prefix):]

    def conversation(self, messages: list[dict], end_text: str = "") -> str:
        """The text before the next assistant answer, for messages {"role": system|user|assistant,
        "content": ...}: optional system first, then user and assistant alternating, ending with user.
        `end_text`: what closes each earlier answer in a style without an end marker; a model is
        trained with its tokenizer's EOS there (`Tokenizer.eos_text`), so prompts for it pass the same."""
        if not [m for m in messages if m["role"] != "system"] or messages[-1]["role"] != "user":
            raise UserError("a conversation must end with a user message")
        return self.render(messages, end_text=end_text)

    def render(self, messages: list[dict], end_text: str) -> str:
        """A conversation as text, ending with a user message (then with its response header: the
        prompt for the next answer) or an assistant one. Each answer is followed by `end_text` when
        the style has no end marker of its own (the tokenizer's EOS text, which it reads as the EOS
        token: training and every prompt for a trained model pass it) and the turn separator."""
        if self.chat_template is not None:
            from instructkit.data.conversations import conversation_problem

            problem = conversation_problem(messages + ([] if messages[-1]["role"] == "assistant" else
                                                       [{"role": "assistant", "content": "."}]))
            if problem is not None and "no assistant" not in problem:
                raise UserError(f"a conversation: {problem}")
            return self._template().render(messages, add_generation_prompt=messages[-1]["role"] == "user")
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(system) > 1 or (system and messages[0]["role"] != "system"):
            raise UserError("a conversation has at most one system message, and it comes first")
        for index, turn in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise UserError(f"message {index + len(system)} has role {turn['role']!r}; expected {expected!r} "
                                "(user and assistant messages alternate, starting with user)")
        text = self.system_text(system[0]) if system and system[0] and not self.system_in_first_turn else ""
        closing = "" if self.end_marker is not None else end_text
        for index, turn in enumerate(turns):
            if turn["role"] == "assistant":
                text += turn["content"] + closing + self.turn_separator
                continue
            content = turn["content"]
            if index == 0 and system and system[0] and self.system_in_first_turn:
                content = self.system_text(system[0]) + content
            text += self.prompt({"instruction": content})
        return text

    def system_text(self, system: str) -> str:
        return self.system_prefix + system + self.system_suffix

    def end_token_id(self, tokenizer: Tokenizer) -> int:
        """The token that ends a response: the style's marker if the tokenizer has it, else EOS."""
        if self.end_marker is not None:
            marker_id = tokenizer.token_id(self.end_marker)
            if marker_id is not None:
                return marker_id
        return tokenizer.eos_id

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Tokens that end generation: the style's end token and every end-of-sequence token of the
        tokenizer (a model may write any: Llama 3 Instruct ends turns with <|eot_id|> and text with
        <|end_of_text|>)."""
        return sorted({*tokenizer.eos_ids, self.end_token_id(tokenizer)})

    def training_text(self, record: dict) -> str:
        return self.prompt(record) + record["output"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> "PromptStyle":
        try:
            return cls(**{**value, "stop_strings": tuple(value.get("stop_strings", ())),
                          "template_tokens": tuple(tuple(pair) for pair in value.get("template_tokens", ()))})
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
    stop_strings=("### Instruction:", "### Response:"),
)

PHI3 = PromptStyle(
    name="phi3",
    instruction_prefix="<|user|>\n",
    input_prefix="\n",
    response_prefix="\n<|assistant|>:\n",
    stop_strings=("<|user|>", "<|assistant|>"),
)

GEMMA = PromptStyle(
    name="gemma",
    instruction_prefix="<start_of_turn>user\n",
    input_prefix="\n\n",
    response_prefix="<end_of_turn>\n<start_of_turn>model\n",
    end_marker="<end_of_turn>",
    turn_separator="<end_of_turn>\n",
    system_in_first_turn=True,
    stop_strings=("<end_of_turn>", "<start_of_turn>"),
)

# ChatML (SmolLM2, Qwen): every message a turn of its own, the system message included.
CHATML = PromptStyle(
    name="chatml",
    instruction_prefix="<|im_start|>user\n",
    input_prefix="\n\n",
    response_prefix="<|im_end|>\n<|im_start|>assistant\n",
    end_marker="<|im_end|>",
    turn_separator="<|im_end|>\n",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    stop_strings=("<|im_end|>", "<|im_start|>"),
)

# Llama 3 Instruct's turns (header tokens, <|eot_id|> closing each message); the tokenizer adds
# <|begin_of_text|> as its BOS.
LLAMA3 = PromptStyle(
    name="llama3",
    instruction_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
    input_prefix="\n\n",
    response_prefix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    end_marker="<|eot_id|>",
    turn_separator="<|eot_id|>",
    system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
    system_suffix="<|eot_id|>",
    stop_strings=("<|eot_id|>", "<|start_header_id|>"),
)

PROMPT_STYLES: dict[str, PromptStyle] = {style.name: style for style in (ALPACA, PHI3, GEMMA, CHATML, LLAMA3)}


def model_style(template: str, tokenizer: Tokenizer, origin: str = "the model's chat template") -> PromptStyle:
    """The prompt style of a model's own chat template (`--prompt-style model`). Its end token is
    the control token the template writes right after an answer (found by rendering one), so
    generation stops where training taught the model to; a template that writes none is refused."""
    from instructkit.data.chat_template import ChatTemplate

    probe_answer = "Hello there"
    tokens = ChatTemplate.for_tokenizer(template, tokenizer).special
    style = PromptStyle(name="model", instruction_prefix="", input_prefix="\n\n", response_prefix="", turn_separator="",
                        chat_template=template, template_tokens=tokens)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe_answer}]
    rendered = style._template().render(messages)
    after = rendered[rendered.rfind(probe_answer) + len(probe_answer):]
    controls = sorted(tokenizer.control_tokens, key=len, reverse=True)
    end = next((after[i:i + len(c)] for i in range(len(after)) for c in controls if after.startswith(c, i)), None)
    if end is None or after[: after.find(end)].strip():
        raise UserError(f"{origin}: writes no control token right after an answer (it writes {after[:30]!r}); a model "
                        "trained with it would never stop. Choose --prompt-style alpaca, phi3, gemma, chatml or llama3")
    return replace(style, end_marker=end, stop_strings=(end,))


def resolve_prompt_style(name: str, loaded) -> PromptStyle:
    """A style by name for a loaded model: "model" is its own chat template (data/chat_template.py)."""
    if name == "model":
        if loaded.chat_template is None:
            raise UserError(f"{loaded.name} has no chat template of its own; choose --prompt-style "
                            f"{', '.join(PROMPT_STYLES)}")
        return model_style(loaded.chat_template, loaded.tokenizer, origin=f"{loaded.name}'s chat template")
    return get_prompt_style(name)


def get_prompt_style(name: str) -> PromptStyle:
    try:
        return PROMPT_STYLES[name]
    except KeyError:
        raise UserError(f"unknown prompt style {name!r} (choose from: {', '.join(PROMPT_STYLES)})") from None
