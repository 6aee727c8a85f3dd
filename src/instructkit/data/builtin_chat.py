"""A built-in multi-turn dataset whose every answer is checked exactly: conversations whose later
questions depend on earlier answers ("Sort these: ..." then "Now only the first two.", "Reverse
that."), so multi-turn fine-tuning has an offline, verifiable target.

`builtin-chat` (or `builtin-chat:N`, `builtin-chat:N:SEED`) generates N conversations (default
600) from the families below, deterministically. Each is a `messages` record with three user turns
and three answers, `task` (the family), `checks` (one exact check per answer, in order; see
evaluate/checks.py) and `key` (the underlying question). As in the single-turn builtin, every key
belongs to one split (a seeded hash of the key), so no test conversation is a training one with
other wording; records come in blocks of one per family, so every split holds the families in
equal shares. Respond answers every turn of a test conversation given the reference answers
before it, and the report scores each turn on its own (`task` "chat-sort turn 2" ...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from instructkit.data.builtin import in_blocks, key_split
from instructkit.errors import UserError

DEFAULT_COUNT, DEFAULT_SEED = 600, 0
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pencil", "garden", "silver", "candle",
         "forest", "window", "rocket", "violin", "desert", "island", "mirror", "thunder", "lemon", "bridge", "castle"]


def _listed(items) -> str:
    return ", ".join(str(item) for item in items)


def _sort_chain(rng: random.Random) -> tuple[tuple, list[tuple[str, str, dict]]]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    ordered = sorted(numbers)
    ask = rng.choice(["Sort these numbers in ascending order: {}", "Put these numbers in order, smallest first: {}"])
    return tuple(numbers), [
        (ask.format(_listed(numbers)), _listed(ordered), {"type": "exact", "answer": _listed(ordered)}),
        ("Now give only the first two.", _listed(ordered[:2]), {"type": "exact", "answer": _listed(ordered[:2])}),
        ("Reverse that.", _listed(ordered[1::-1]), {"type": "exact", "answer": _listed(ordered[1::-1])}),
    ]


def _word_chain(rng: random.Random) -> tuple[tuple, list[tuple[str, str, dict]]]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    ordered = sorted(words)
    upper = [w.upper() for w in ordered]
    return tuple(words), [
        (f"List these words in alphabetical order: {_listed(words)}", _listed(ordered), {"type": "exact", "answer": _listed(ordered)}),
        ("Now write them in capital letters.", _listed(upper), {"type": "exact_case", "answer": _listed(upper)}),
        ("How many words is that?", str(len(words)), {"type": "number", "answer": len(words)}),
    ]


def _arithmetic_chain(rng: random.Random) -> tuple[tuple, list[tuple[str, str, dict]]]:
    a, b, times, minus = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 5), rng.randint(1, 20)
    first, second = a + b, (a + b) * times
    third = second - minus
    return (a, b, times, minus), [
        (f"What is {a} + {b}?", str(first), {"type": "number", "answer": first}),
        (f"Multiply that by {times}.", str(second), {"type": "number", "answer": second}),
        (f"Now subtract {minus}.", str(third), {"type": "number", "answer": third}),
    ]


@dataclass(frozen=True)
class ChatFamily:
    name: str
    draw: Callable[[random.Random], tuple[tuple, list[tuple[str, str, dict]]]]


FAMILIES = [ChatFamily("chat-sort", _sort_chain), ChatFamily("chat-words", _word_chain),
            ChatFamily("chat-arithmetic", _arithmetic_chain)]


def _record(family: ChatFamily, rng: random.Random, split: str, seed: int, seen: set[str]) -> dict:
    for _ in range(5000):
        question, turns = family.draw(rng)
        key = f"{family.name}:{list(question)}"
        if key in seen or key_split(key, seed) != split:
            continue
        seen.add(key)
        messages = []
        for user, answer, _ in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return {"messages": messages, "task": family.name, "checks": [check for *_, check in turns], "key": key}
    raise UserError(f"builtin-chat: cannot make another distinct {family.name} conversation for the {split} split; "
                    "ask for fewer")


def generate_builtin_chat(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict]:
    if count < 10 * len(FAMILIES):
        raise UserError(f"builtin-chat:{count}: ask for at least {10 * len(FAMILIES)} conversations")
    rng = random.Random(seed)
    seen: set[str] = set()
    return in_blocks(count, FAMILIES, rng, lambda family, split: _record(family, rng, split, seed, seen))


def parse_builtin_chat_spec(source: str) -> tuple[int, int] | None:
    """'builtin-chat' -> (600, 0); 'builtin-chat:N' -> (N, 0); 'builtin-chat:N:SEED'; else None."""
    if source != "builtin-chat" and not source.startswith("builtin-chat:"):
        return None
    try:
        values = [int(p) for p in source.split(":")[1:]]
    except ValueError:
        raise UserError(f"{source}: expected builtin-chat, builtin-chat:N or builtin-chat:N:SEED with whole numbers") from None
    if len(values) > 2 or any(v < 0 for v in values):
        raise UserError(f"{source}: expected builtin-chat, builtin-chat:N or builtin-chat:N:SEED")
    return (values[0] if values else DEFAULT_COUNT, values[1] if len(values) > 1 else DEFAULT_SEED)
