"""The OpenAI API shapes the server reads and writes (the parts it implements).

Unknown request fields are ignored, as OpenAI's own server does; errors always come back as
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def _unicode(value: str) -> str:
    """JSON may escape a lone surrogate ("\\ud800"): Python keeps it, no tokenizer can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains {value[exc.start:exc.end]!a} at character {exc.start}, a lone surrogate "
                         "that is not valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class ContentPart(BaseModel):
    """One of OpenAI's content parts; only text parts are read (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: Annotated[Text, Strict()] | None = None

    @model_validator(mode="after")
    def _text_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string 'text'")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, Strict()] | list[ContentPart] | None = ""

    def text(self) -> str:
        """Plain text content; list content (OpenAI's parts) is joined from its text parts."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


MAX_STOP_STRINGS = 16


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stop: Text | list[Text] | None = None
    # What torch.Generator.manual_seed takes (2**70 used to end in a 500).
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("stop")
    @classmethod
    def _a_few(cls, value):
        # OpenAI takes 4; lm-evaluation-harness's local-completions sends a task's stop strings plus
        # the EOS text, which can be more, as vLLM accepts.
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


TokenIds = list[Annotated[int, Strict(), Field(ge=0)]]


class CompletionRequest(_Generation):
    # A text, texts, token ids, or lists of token ids (lm-evaluation-harness sends ids).
    prompt: Text | TokenIds | list[Text] | list[TokenIds]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for /v1/completions; 0 only with echo
    echo: bool = False  # the prompt's text, and with logprobs its tokens' log-probabilities, before the answer
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the top N alternatives per token (0: none)

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request: one text, or one list of token ids, each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Text
    add_special_tokens: bool = True  # BOS, where the model's tokenizer adds one
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: TokenIds
    model: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "instructkit"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
