"""`instructkit chat`: a streaming terminal chat with a model, in our own engine.

Multi-turn by the prompt style's conversation rule (data/prompts.py); greedy unless /temp says
otherwise, so answers are reproducible (with --seed, sampled ones too: turn k samples from
seed + k). Ctrl-C stops the answer being written and keeps the conversation; tokens/s after
every answer. Commands: /reset, /system TEXT, /temp X, /max N, /quit. With the decode step
compiling in the background (chat's default, decode/background.py), a line after an answer says
so, and another when the compiled step has taken over.
"""

from __future__ import annotations

import sys
import time

from instructkit.data.prompts import PromptStyle
from instructkit.decode.generate import Sampling, TextStream, stream_tokens
from instructkit.models.registry import LoadedModel
from instructkit.serve.conversation import encode_conversation

HELP = "Commands: /reset, /system TEXT, /temp X, /max N, /quit. Ctrl-C stops an answer; Ctrl-D or /quit ends."


class ChatSession:
    def __init__(self, loaded: LoadedModel, style: PromptStyle, *, temperature: float = 0.0, max_tokens: int = 256,
                 seed: int | None = None, system: str = ""):
        self.loaded, self.style = loaded, style
        self.temperature, self.max_tokens, self.seed, self.system = temperature, max_tokens, seed, system
        self.history: list[dict] = []
        self.last_tokens = 0  # tokens of the latest answer, stopped or not
        self._decoding_said: str | None = None

    def decoding_note(self) -> str | None:
        """A line about how the model decodes (eager while compiling, compiled, failed), when that
        changed since it was last said; None otherwise (and always for a model with no background
        compile)."""
        handle = getattr(self.loaded.model, "background_compile", None)
        state = handle.state if handle is not None else None  # read once: the thread may change it
        if state is None or state == self._decoding_said:
            return None
        self._decoding_said = state
        if state == "compiling":
            return "(decoding eagerly while the decode step compiles in the background; faster answers once it is ready)"
        if state == "compiled":
            return f"(compiled decode step in use from here on: ready after {handle.seconds:.0f} s)"
        return f"({handle.error}; decoding stays eager)"

    def command(self, line: str) -> str | None:
        """Apply a /command; returns what to print, or None for /quit."""
        name, _, argument = line.partition(" ")
        if name == "/quit":
            return None
        if name == "/reset":
            self.history = []
            return "(conversation cleared)"
        if name == "/system":
            self.system = argument.strip()
            return f"(system prompt {'set' if self.system else 'cleared'})"
        if name in ("/temp", "/max"):
            try:
                value = float(argument) if name == "/temp" else int(argument)
            except ValueError:
                return f"({name} needs a number)"
            if (name == "/temp" and not 0 <= value <= 2) or (name == "/max" and value < 1):
                return "(/temp takes 0 to 2, /max a positive whole number)"
            if name == "/temp":
                self.temperature = value
            else:
                self.max_tokens = value
            return f"({'temperature' if name == '/temp' else 'max tokens'} {value})"
        return f"(unknown command {name}; {HELP})"

    def answer(self, text: str, write) -> tuple[str, int, float]:
        """Stream an answer through `write`; returns (answer, tokens, seconds). Ctrl-C (a
        KeyboardInterrupt) stops it and keeps what was written."""
        tokenizer = self.loaded.tokenizer
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        prompt = encode_conversation(self.style, messages, tokenizer)  # what the user types stays text
        turn = len(self.history) // 2
        sampling = Sampling(temperature=self.temperature, seed=None if self.seed is None else self.seed + turn)
        tokens = stream_tokens(self.loaded.model, tokenizer, prompt, max_new_tokens=self.max_tokens,
                               stop_ids=self.style.stop_ids(tokenizer), sampling=sampling)
        stream = TextStream(tokenizer, self.style.stop_strings)
        started = time.perf_counter()
        try:
            for token in tokens:
                write(stream.push(token))
                if stream.stopped:
                    break
            write(stream.finish())
        finally:
            tokens.close()
            self.last_tokens = len(stream.ids)
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": stream.text}]
        return stream.text, len(stream.ids), time.perf_counter() - started


def run_chat(session: ChatSession, *, read=input, out=sys.stdout) -> None:
    def write(piece: str) -> None:
        if piece:
            out.write(piece)
            out.flush()

    out.write(f"Chatting with {session.loaded.name} (prompt style {session.style.name}, "
              f"{'greedy' if session.temperature == 0 else f'temperature {session.temperature}'}). {HELP}\n")
    out.flush()
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line.strip())
            if said is None:
                return
            out.write(said + "\n")
            continue
        started, stopped = time.perf_counter(), False
        try:
            session.answer(line, write)
        except KeyboardInterrupt:
            stopped = True
        seconds, tokens = max(time.perf_counter() - started, 1e-9), session.last_tokens
        out.write(f"\n[{'stopped; ' if stopped else ''}{tokens} tokens, {tokens / seconds:.1f} tokens/s]\n")
        if note := session.decoding_note():
            out.write(note + "\n")
        out.flush()
