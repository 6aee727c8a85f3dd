"""A conversation to token ids with its messages' text read as text.

A prompt style renders messages into one string, and encoding that string would read a
`<start_of_turn>` or `<|im_start|>` typed inside a message as the control token: a user could
forge turns. Training data refuses such text (data/tokenize.py); a server cannot refuse what
users type, so it encodes it as plain text. Only the control tokens the style's own template
writes stay control tokens: the conversation is rendered with each message replaced by a
placeholder, cut at the control tokens found in that rendering, and every stretch between them
(the messages put back) is encoded with `Tokenizer.encode_text`. Since tokenizers already cut
text at control tokens, a conversation without forged ones gets exactly `encode(conversation)`.
"""

from __future__ import annotations

import re

from instructkit.data.prompts import PromptStyle
from instructkit.models.tokenizer import Tokenizer


def _marker(messages: list[dict]) -> str:
    """A private-use character that no message contains, to build placeholders from."""
    text = "".join(m["content"] for m in messages)
    return next(chr(code) for code in range(0xE000, 0xF900) if chr(code) not in text)


def encode_conversation(style: PromptStyle, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """Ids of `style.conversation(messages, tokenizer.eos_text)` (with BOS), message text encoded as text."""
    mark = _marker(messages)
    # Empty messages stay empty: the style treats an empty system message as none.
    placeholders = [{**m, "content": f"{mark}{i}{mark}" if m["content"] else ""} for i, m in enumerate(messages)]
    template = style.conversation(placeholders, tokenizer.eos_text)  # earlier answers closed as in training
    controls = sorted(tokenizer.control_tokens & set(re.findall(r"<[^<>\s]{1,64}>", template)), key=len, reverse=True)
    pieces = re.split(f"({'|'.join(map(re.escape, controls))})", template) if controls else [template]
    restore = re.compile(f"{mark}(\\d+){mark}")
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for index, piece in enumerate(pieces):
        if index % 2:  # re.split puts the separators (the template's control tokens) at odd indices
            ids += tokenizer.encode_rendered(piece)[0][-1:]  # the control token's id (after any BOS)
        elif piece:
            ids += tokenizer.encode_text(restore.sub(lambda found: messages[int(found.group(1))]["content"], piece))
    return ids
