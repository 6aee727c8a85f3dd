"""Conversation records: OpenAI `messages` and ShareGPT `conversations`, read into one shape and
validated as strictly as Alpaca records.

    {"messages": [{"role": "system" | "user" | "assistant", "content": str, "name"?: str}, ...], ...}

is what every conversation becomes (other keys of the record are kept). ShareGPT's
{"conversations": [{"from": "human" | "gpt" | "system", "value": str}]} maps `from` to the role
(human/user -> user, gpt/assistant/model -> assistant, system -> system). A file's format is found
from its first record (`detect_format`) unless given (`--format`); field names other than these are
mapped with `Columns` (`--columns messages=dialog,role=speaker,content=text`).

The rules (each fault is reported with the record and the message index): a system message only
first; then user and assistant alternate, starting with user; roles are one of the three; content
is a string; no assistant message is empty; at least one assistant message; no literal control
token in any text. An Alpaca record is the conversation [user: instruction (+ input), assistant:
output] (`alpaca_messages`), so both shapes train through the same renderer.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructkit.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


@dataclass(frozen=True)
class Columns:
    """Field names of a conversation file: the list of messages and, in each message, the role and
    the text. Defaults per format; `parse` reads `--columns KEY=NAME,...`."""

    messages: str | None = None
    role: str | None = None
    content: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Columns":
        if not text:
            return cls()
        values = {}
        for item in text.split(","):
            key, sep, name = item.partition("=")
            key, name = key.strip(), name.strip()
            if not sep or key not in ("messages", "role", "content") or not name:
                raise UserError(f"--columns: {item!r} is not KEY=NAME with KEY one of messages, role, content "
                                "(e.g. --columns messages=dialog,role=speaker,content=text)")
            values[key] = name
        return cls(**values)

    def names(self, fmt: str) -> tuple[str, str, str]:
        default = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        return self.messages or default[0], self.role or default[1], self.content or default[2]


def detect_format(value: object, columns: Columns = Columns()) -> str | None:
    """The format a record looks like, or None."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get(columns.names("messages")[0]), list):
        return "messages"
    if isinstance(value.get(columns.names("sharegpt")[0]), list):
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    return None


def normalize_conversation(value: dict, fmt: str, columns: Columns, controls: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """A messages or ShareGPT record -> {"messages": [...], other keys}, or what is wrong with it."""
    list_key, role_key, content_key = columns.names(fmt)
    if not isinstance(value, dict):
        return None, f"is not an object, expected one with {list_key!r}"
    raw = value.get(list_key)
    if not isinstance(raw, list):
        return None, f"missing key {list_key!r} (a list of messages)" if list_key not in value else \
            f"field {list_key!r} is not a list of messages"
    messages = []
    for index, message in enumerate(raw):
        where = f"message {index}"
        if not isinstance(message, dict):
            return None, f"{where} is not an object with {role_key!r} and {content_key!r}"
        if role_key not in message:
            return None, f"{where} has no {role_key!r}"
        role = message[role_key]
        if fmt == "sharegpt":
            role = SHAREGPT_ROLES.get(role.lower() if isinstance(role, str) else role)
            if role is None:
                return None, (f"{where} has {role_key} {message[role_key]!r}; expected one of "
                              f"{', '.join(sorted(SHAREGPT_ROLES))}")
        elif role not in ROLES:
            return None, f"{where} has role {role!r}; expected one of {', '.join(ROLES)}"
        content = message.get(content_key)
        if not isinstance(content, str):
            return None, f"{where} ({role}) has no text: {content_key!r} is {'missing' if content_key not in message else 'not a string'}"
        for literal in controls:
            if literal in content:
                return None, f"{where} ({role}) contains the literal control token {literal!r}"
        normalized = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            normalized["name"] = message["name"]
        messages.append(normalized)
    if (problem := conversation_problem(messages)) is not None:
        return None, problem
    record = {key: item for key, item in value.items() if key != list_key}
    record["messages"] = messages
    return record, None


def conversation_problem(messages: list[dict]) -> str | None:
    """What breaks the turn rules, naming the message, or None."""
    if not messages:
        return "has no messages"
    offset = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                return f"message {index} is a system message; only the first message may be one"
            continue
        expected = "user" if (index - offset) % 2 == 0 else "assistant"
        if role != expected:
            return (f"message {index} has role {role!r} where {expected!r} was expected "
                    "(after an optional system message, user and assistant alternate, starting with user)")
        if role == "assistant" and not message["content"].strip():
            return f"message {index} (assistant) is empty"
    if not any(message["role"] == "assistant" for message in messages):
        return "has no assistant message: nothing to train on"
    return None


def alpaca_messages(record: dict, input_separator: str = "\n\n") -> list[dict]:
    """An Alpaca record as a conversation: the instruction (and its input) from the user, the
    output from the assistant."""
    user = record["instruction"] + (input_separator + record["input"] if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def record_messages(record: dict) -> list[dict]:
    """Any record's conversation (Alpaca records converted)."""
    return record["messages"] if "messages" in record else alpaca_messages(record)


def user_text(record: dict) -> str:
    """The user turns of a record joined: what splits, near-duplicate grouping and leakage checks
    compare for conversations (the instruction and input for Alpaca records)."""
    if "messages" not in record:
        return record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    return "\n".join(message["content"] for message in record["messages"] if message["role"] == "user")


def comparison_fields(record: dict) -> dict:
    """The instruction / input / output a dataset tool (dedup, leakage) compares: an Alpaca
    record's own; for a conversation, its user turns joined (the instruction, no input) and its
    answers joined (the output)."""
    if "messages" not in record:
        return record
    answers = "\n".join(message["content"] for message in record["messages"] if message["role"] == "assistant")
    return {"instruction": user_text(record), "input": "", "output": answers}


def scored_entries(record: dict) -> list[dict]:
    """A record as respond and evaluate read it. An Alpaca record is itself. A conversation is one
    entry per answer: the messages through that answer (the prompt is rendered from those before
    it, with the reference answers as history), its user message as `instruction`, the answer as
    `output`, and, where the record has `checks` (one per answer), that answer's `check` and a
    `task` naming the turn ("chat-sort turn 2"), so the report scores every turn on its own."""
    if "messages" not in record:
        return [record]
    messages, entries = record["messages"], []
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    checks = record.get("checks")
    rest = {key: value for key, value in record.items() if key not in ("messages", "checks")}
    for turn, index in enumerate(answers):
        question = next(m["content"] for m in reversed(messages[:index]) if m["role"] == "user")
        entry = {**rest, "messages": messages[: index + 1], "instruction": question, "input": "",
                 "output": messages[index]["content"], "turn": turn + 1}
        if isinstance(checks, list) and turn < len(checks):
            entry["check"] = checks[turn]
            entry["task"] = f"{record.get('task', 'chat')} turn {turn + 1}"
        entries.append(entry)
    return entries
