"""One dedup measurement in a process of its own: {"records": N, "method": M, "seed": S}.

The corpus is synthetic and Alpaca-like: instructions from 40 task templates filled with words of
a 6,000-word made-up vocabulary, inputs and outputs of 0-25 and 3-40 words; 2% of the records are
planted near-duplicates of an earlier one (one word of an output of 20+ words changed). Prints one JSON line: wall
time of find_duplicates over the three fields, peak RSS, pairs found, and how many planted
near-duplicates were found (recall)."""

from __future__ import annotations

import json
import random
import sys
import time

from bench.common import peak_rss_bytes

TEMPLATES = ["Rewrite the following sentence", "Summarize the text about", "Translate into French the phrase",
             "Classify the sentiment of", "Give three synonyms for", "Explain the meaning of", "Write a haiku about",
             "List the main ideas of", "Correct the grammar in", "Name an antonym of", "Describe the process of",
             "Convert to passive voice", "Generate a title for", "Find the verb in", "Identify the subject of",
             "Compose a tweet about", "Suggest a name for", "Give an example of", "Write a question about",
             "Create a slogan for", "Define the word", "Make a list of", "Paraphrase", "Expand the idea of",
             "Shorten the sentence", "Describe a day at", "Compare", "Contrast", "Outline an essay on",
             "Explain why", "Write a recipe for", "Propose a plan for", "Evaluate the claim that",
             "Give advice on", "Write an email about", "Name the capital of", "Calculate the total of",
             "Sort the words", "Spell backwards", "Count the letters in"]


def vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "sh", "qu", "str", "pl"]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def corpus(count: int, seed: int) -> tuple[list[dict], list[tuple[int, int]]]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    phrase = lambda low, high: " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))  # noqa: E731
    records, planted = [], []
    for index in range(count):
        if index > 100 and rng.random() < 0.02:
            source = rng.randrange(index)
            while len(records[source]["output"].split()) < 20:  # long enough that one word is a small change
                source = rng.randrange(index)
            copy = dict(records[source])
            tokens = copy["output"].split()
            tokens[rng.randrange(len(tokens) - 1)] = rng.choice(words)
            copy["output"] = " ".join(tokens)
            records.append(copy)
            planted.append((source, index))
            continue
        records.append({"instruction": f"{rng.choice(TEMPLATES)} {phrase(1, 4)}.", "input": phrase(0, 25),
                        "output": phrase(3, 40) + "."})
    return records, planted


def main() -> None:
    spec = json.loads(sys.argv[1])
    from instructkit.datatools.dedup import find_duplicates

    records, planted = corpus(spec["records"], spec.get("seed", 0))
    started = time.perf_counter()
    result = find_duplicates(records, method=spec["method"], progress=False)
    seconds = time.perf_counter() - started
    found = {(p.first, p.second) for p in result.pairs if p.field == "output"}
    recall = sum((a, b) in found for a, b in planted) / max(1, len(planted))
    print(json.dumps({"records": len(records), "method": result.method, "seconds": seconds, "pairs": len(result.pairs),
                      "per_field": result.per_field, "planted": len(planted), "planted_recall": recall,
                      "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
