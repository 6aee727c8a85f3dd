"""The chapter's cacheless responses, timed in a process of its own:
`python -m bench.quality_worker SPEC_JSON` prints one JSON line with seconds per response.

The chapter generates each test response with its `generate` (no KV cache, the whole context
re-run every token) for up to 256 new tokens, stopping at <|endoftext|>. Random weights never
stop, so each sampled response is cut at the length of the book's own responses (in tokens), the
work the chapter's model actually did."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from instructkit.data.pipeline import prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.decode.generate import generate_cacheless
    from instructkit.models.registry import load_model

    spec = json.loads(sys.argv[1])
    loaded = load_model(spec["model"], seed=0)
    book = json.loads(open(spec["data"].replace("instruction-data.json", "instruction-data-with-response.json")).read())
    entries = prepare_data(spec["data"]).splits.test[: spec["prompts"]]
    seconds, tokens = 0.0, 0
    for entry, answer in zip(entries, book):
        prompt = loaded.tokenizer.encode(ALPACA.prompt(entry))
        budget = max(1, len(loaded.tokenizer.encode(answer["model_response"])) + 1)  # + its end token
        start = time.perf_counter()
        generate_cacheless(loaded.model, loaded.tokenizer, prompt, max_new_tokens=budget)
        seconds += time.perf_counter() - start
        tokens += budget
    print(json.dumps({**spec, "seconds_per_response": seconds / len(entries), "tokens": tokens}))


if __name__ == "__main__":
    main()
