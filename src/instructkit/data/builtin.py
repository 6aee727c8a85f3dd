"""A built-in instruction dataset whose every answer can be checked exactly.

`builtin` (or `builtin:N`, `builtin:N:SEED`) generates N records (default 1,100, like the
chapter's) from 15 task families, deterministically: the same N and seed give the same bytes.
Records are Alpaca-style plus `task` (the family) and `check` (how to score a response:
exact string, number with tolerance, set of items, JSON equality; see evaluate/checks.py).
Every family has several phrasings, some with an `input` field, some without; answers are short
(a 270M model can learn them in an epoch) and unambiguous. Prompts are unique, so the chapter's
split (85 / 10 / 5 in order) cannot leak a test prompt into training.
"""

from __future__ import annotations

import datetime as dt
import json
import random

from instructkit.errors import UserError

DEFAULT_COUNT, DEFAULT_SEED = 1100, 0

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "coins", "cards"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "garden", "window", "rocket", "candle",
         "forest", "bottle", "dragon", "island", "jacket", "kettle", "ladder", "magnet", "needle", "orange", "pepper",
         "rabbit", "saddle", "tomato", "violin", "walnut", "yogurt", "zebra", "anchor", "bridge", "castle"]
FRUITS = ["apple", "pear", "banana", "cherry", "mango", "plum", "peach", "grape", "lemon", "kiwi"]
VEGETABLES = ["carrot", "potato", "onion", "leek", "celery", "spinach", "pepper", "turnip"]
ANIMALS = ["dog", "cat", "horse", "rabbit", "goat", "sheep", "tiger", "zebra"]
IRREGULAR_PLURALS = {"child": "children", "mouse": "mice", "goose": "geese", "man": "men", "woman": "women",
                     "tooth": "teeth", "foot": "feet", "person": "people", "ox": "oxen", "cactus": "cacti"}
REGULAR_NOUNS = ["box", "bus", "city", "baby", "key", "day", "dish", "church", "fox", "leaf", "knife", "story",
                 "toy", "glass", "hero", "potato", "wolf", "lady", "party", "watch", "cat", "dog", "tree", "house",
                 "car", "bird", "book", "chair", "table", "brush", "class", "wish", "tax", "berry", "cherry",
                 "donkey", "monkey", "lamp", "boat", "horse"]
MISSPELLINGS = {"receive": "recieve", "separate": "seperate", "definitely": "definately", "necessary": "neccessary",
                "occasion": "ocassion", "beginning": "begining", "believe": "beleive", "tomorrow": "tommorow",
                "address": "adress", "calendar": "calender", "government": "goverment", "library": "libary"}
SENTENCES = ["I will {w} it tomorrow.", "We need to {w} this soon.", "She wrote the {w} on a card.",
             "They talked about the {w} at lunch.", "He said it was {w}."]
KEYS = ["name", "city", "age", "color", "country", "job"]
VALUES = {"name": NAMES, "city": ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Dakar"],
          "age": [str(n) for n in range(18, 80)], "color": ["red", "blue", "green", "black", "white"],
          "country": ["Peru", "Chad", "Fiji", "Laos", "Oman", "Togo"], "job": ["baker", "nurse", "pilot", "judge", "chef"]}
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun in ("leaf", "wolf"):
        return noun[:-1] + "ves"
    if noun == "knife":
        return "knives"
    if noun in ("hero", "potato"):
        return noun + "es"
    return noun + "s"


def _rec(task, instruction, output, check, input_text=""):
    return {"instruction": instruction, "input": input_text, "output": output, "task": task, "check": check}


def _exact(task, instruction, answer, input_text=""):
    return _rec(task, instruction, answer, {"type": "exact", "answer": answer}, input_text)


def _number(task, instruction, value, input_text="", tolerance=1e-6):
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return _rec(task, instruction, text, {"type": "number", "answer": value, "tolerance": tolerance}, input_text)


def arithmetic(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 40), r.randint(2, 30)
    if r.random() < 0.5:
        text = r.choice(["{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
                         "{n} had {a} {i}. A friend gave {n} {b} more. How many {i} does {n} have?"])
        answer = a + b
    else:
        a, b = max(a, b) + r.randint(1, 10), min(a, b)
        text = r.choice(["{n} has {a} {i} and gives away {b}. How many {i} are left?",
                         "There were {a} {i}. {n} took {b}. How many {i} remain?"])
        answer = a - b
    problem = text.format(n=name, a=a, b=b, i=item)
    if r.random() < 0.3:  # the problem as input, with a generic instruction
        return _number("arithmetic", r.choice(["Solve the word problem.", "Answer with a number."]), answer, problem)
    return _number("arithmetic", problem, answer)


def unit_conversion(r: random.Random):
    kind = r.choice(["km_m", "kg_g", "h_min", "m_cm", "min_s"])
    value = r.randint(1, 60)
    units = {"km_m": ("kilometers", "meters", 1000), "kg_g": ("kilograms", "grams", 1000),
             "h_min": ("hours", "minutes", 60), "m_cm": ("meters", "centimeters", 100), "min_s": ("minutes", "seconds", 60)}
    big, small, factor = units[kind]
    if r.random() < 0.5:
        text = r.choice(["Convert {v} {b} to {s}.", "How many {s} are in {v} {b}?"])
        return _number("unit_conversion", text.format(v=value, b=big, s=small), value * factor)
    return _number("unit_conversion", f"Convert the quantity to {big}.", value, f"{value * factor} {small}")


def reverse_list(r: random.Random):
    items = r.sample(WORDS, r.randint(3, 5))
    instruction = r.choice(["Reverse the order of the list.", "Write the items in reverse order.", "List these items backwards."])
    return _exact("reverse_list", instruction, ", ".join(reversed(items)), ", ".join(items))


def sort_list(r: random.Random):
    if r.random() < 0.5:
        items = r.sample(WORDS, r.randint(3, 5))
        return _exact("sort_list", r.choice(["Sort the words alphabetically.", "Put these words in alphabetical order."]),
                      ", ".join(sorted(items)), ", ".join(items))
    numbers = r.sample(range(1, 100), r.randint(3, 6))
    return _exact("sort_list", r.choice(["Sort the numbers from smallest to largest.", "Arrange the numbers in ascending order."]),
                  ", ".join(map(str, sorted(numbers))), ", ".join(map(str, numbers)))


def count(r: random.Random):
    if r.random() < 0.5:
        words = r.sample(WORDS, r.randint(3, 8))
        return _number("count", r.choice(["How many words are in the sentence?", "Count the words."]), len(words), " ".join(words))
    word = r.choice(WORDS)
    letter = r.choice(sorted(set(word)))
    return _number("count", f"How many times does the letter '{letter}' appear in the word '{word}'?", word.count(letter))


def case_change(r: random.Random):
    text = " ".join(r.sample(WORDS, r.randint(2, 4)))
    style = r.choice(["upper", "title", "lower"])
    if style == "lower":
        text = text.title()
    instruction = {"upper": ["Convert the text to uppercase.", "Write this in capital letters."],
                   "title": ["Convert the text to title case.", "Capitalize the first letter of each word."],
                   "lower": ["Convert the text to lowercase.", "Write this in small letters only."]}[style]
    answer = {"upper": text.upper(), "title": text.title(), "lower": text.lower()}[style]
    return _rec("case", r.choice(instruction), answer, {"type": "exact_case", "answer": answer}, text)


def plurals(r: random.Random):
    noun = r.choice(list(IRREGULAR_PLURALS) + REGULAR_NOUNS)
    if r.random() < 0.5:
        template = r.choice(["What is the plural of '{n}'?", "Write the plural form of '{n}'.", "One {n}, two ...?"])
        return _exact("plural", template.format(n=noun), plural(noun))
    instruction = r.choice(["Give the plural form of the noun.", "Make the noun plural."])
    return _exact("plural", instruction, plural(noun), noun)


def number_to_words(r: random.Random):
    n = r.randint(0, 999)
    if r.random() < 0.5:
        return _exact("number_words", f"Write the number {n} in words.", number_words(n))
    return _exact("number_words", "Spell out the number in English words.", number_words(n), str(n))


def dates(r: random.Random):
    day = dt.date(2024, 1, 1) + dt.timedelta(days=r.randint(0, 700))
    if r.random() < 0.25:
        return _exact("dates", "Name the day of the week of this date.", day.strftime("%A"), day.isoformat())
    if r.random() < 0.35:
        return _exact("dates", f"What day of the week is {day.isoformat()}?", day.strftime("%A"))
    offset = r.randint(1, 40)
    return _exact("dates", f"What date is {offset} days after {day.isoformat()}? Answer as YYYY-MM-DD.",
                  (day + dt.timedelta(days=offset)).isoformat())


def json_extract(r: random.Random):
    keys = r.sample(KEYS, 3)
    obj = {k: r.choice(VALUES[k]) for k in keys}
    key = r.choice(keys)
    template = r.choice(["What is the value of the field '{k}' in this JSON?", "Extract the '{k}' field from the JSON object.",
                         "From the JSON below, give the value of '{k}'."])
    return _exact("json_extract", template.format(k=key), obj[key], json.dumps(obj))


def to_json(r: random.Random):
    keys = r.sample(KEYS, r.randint(2, 3))
    obj = {k: r.choice(VALUES[k]) for k in keys}
    text = "; ".join(f"{k}: {v}" for k, v in obj.items())
    return _rec("to_json", r.choice(["Turn the key-value pairs into a JSON object with string values.",
                                     "Convert this to JSON (all values as strings)."]),
                json.dumps(obj), {"type": "json", "answer": obj}, text)


def filter_list(r: random.Random):
    numbers = r.sample(range(1, 60), r.randint(4, 7))
    rule, keep = r.choice([("even", lambda n: n % 2 == 0), ("odd", lambda n: n % 2 == 1),
                           ("greater than 30", lambda n: n > 30), ("less than 20", lambda n: n < 20)])
    kept = [n for n in numbers if keep(n)] or [numbers[0]]
    if kept == [numbers[0]] and not keep(numbers[0]):
        numbers = numbers + [{"even": 42, "odd": 41, "greater than 30": 55, "less than 20": 7}[rule]]
        kept = [n for n in numbers if keep(n)]
    answer = ", ".join(map(str, kept))
    return _exact("filter_list", f"Keep only the numbers that are {rule}, in their original order.",
                  answer, ", ".join(map(str, numbers)))


def spelling(r: random.Random):
    right, wrong = r.choice(list(MISSPELLINGS.items()))
    sentence = r.choice(SENTENCES)
    return _exact("spelling", r.choice(["Fix the spelling mistake in the sentence.", "Correct the misspelled word."]),
                  sentence.format(w=right), sentence.format(w=wrong))


def odd_one_out(r: random.Random):
    group, other, label = r.choice([(FRUITS, VEGETABLES, "a fruit"), (ANIMALS, FRUITS, "an animal"),
                                    (VEGETABLES, ANIMALS, "a vegetable")])
    items = r.sample(group, 3)
    odd = r.choice(other)
    items.insert(r.randint(0, 3), odd)
    return _exact("odd_one_out", f"Which item is not {label}?", odd, ", ".join(items))


def classify(r: random.Random):
    n = r.randint(2, 99)
    if r.random() < 0.5:
        prime = all(n % d for d in range(2, int(n**0.5) + 1))
        return _exact("classify", f"Is {n} a prime or a composite number? Answer with one word.", "prime" if prime else "composite")
    value = r.randint(-50, 50) or 1
    return _exact("classify", "Classify the number as positive or negative.", "positive" if value > 0 else "negative", str(value))


FAMILIES = [arithmetic, unit_conversion, reverse_list, sort_list, count, case_change, plurals, number_to_words,
            dates, json_extract, to_json, filter_list, spelling, odd_one_out, classify]


def generate_builtin(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict]:
    """N unique records, round-robin over the families, in a seeded random order."""
    if count < len(FAMILIES):
        raise UserError(f"builtin:{count}: ask for at least {len(FAMILIES)} examples (one per task family)")
    rng = random.Random(seed)
    records, seen = [], set()
    attempts = 0
    while len(records) < count:
        family = FAMILIES[len(records) % len(FAMILIES)]
        record = family(rng)
        key = (record["instruction"], record["input"])
        attempts += 1
        if attempts > count * 50:
            raise UserError(f"builtin:{count}: cannot make that many distinct examples")
        if key in seen:
            continue
        seen.add(key)
        records.append(record)
    rng.shuffle(records)
    return records


def parse_builtin_spec(source: str) -> tuple[int, int] | None:
    """'builtin' -> (1100, 0); 'builtin:N' -> (N, 0); 'builtin:N:SEED' -> (N, SEED); else None."""
    if source != "builtin" and not source.startswith("builtin:"):
        return None
    parts = source.split(":")[1:]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{source}: expected builtin, builtin:N or builtin:N:SEED with whole numbers") from None
    if len(values) > 2 or any(v < 0 for v in values):
        raise UserError(f"{source}: expected builtin, builtin:N or builtin:N:SEED")
    return (values[0] if values else DEFAULT_COUNT, values[1] if len(values) > 1 else DEFAULT_SEED)
