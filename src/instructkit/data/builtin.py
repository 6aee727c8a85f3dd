"""A built-in instruction dataset whose every answer can be checked exactly.

`builtin` (or `builtin:N`, `builtin:N:SEED`) generates N records (default 1,100, like the
chapter's) from 15 task families, deterministically: the same N and seed give the same bytes.
Records are Alpaca-style plus `task` (the family) and `check` (how to score a response:
exact string, number with tolerance, set of items, JSON equality; see evaluate/checks.py).
Every family has several phrasings, some with an `input` field, some without; answers are short
and unambiguous, and pitched where Gemma 3 270M can learn them in one epoch (see the notes in
arithmetic, dates, sort_list). Prompts are unique, so the chapter's split (85 / 10 / 5 in order)
cannot leak a test prompt into training, and records come in blocks of one per family, so every
split holds the families in equal shares.
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
    # One more or one fewer of a single-digit count. Gemma 3 270M's own arithmetic stops about
    # there (few-shot, before tuning: 5 + 1 = 6 and 6 - 1 = 5, but 3 + 3 = 5, 8 + 2 = 11 and
    # 12 + 1 = 10), and fine-tuning on ~60 examples teaches the format, not addition.
    name, item = r.choice(NAMES), r.choice(ITEMS)
    one = r.choice(["one", "1"])
    if r.random() < 0.5:
        a = r.randint(1, 9)
        text = r.choice(["{n} has {a} {i} and gets {one} more. How many {i} does {n} have now?",
                         "{n} had {a} {i}. A friend gave {n} {one} more. How many {i} does {n} have?"])
        answer = a + 1
    else:
        a = r.randint(2, 10)
        text = r.choice(["{n} has {a} {i} and gives away {one}. How many {i} are left?",
                         "There were {a} {i}. {n} took {one}. How many {i} remain?"])
        answer = a - 1
    problem = text.format(n=name, a=a, one=one, i=item)
    if r.random() < 0.3:  # the problem as input, with a generic instruction
        return _number("arithmetic", r.choice(["Solve the word problem.", "Answer with a number."]), answer, problem)
    return _number("arithmetic", problem, answer)


UNITS = {"km_m": ("kilometers", "meters", 1000), "kg_g": ("kilograms", "grams", 1000), "l_ml": ("liters", "milliliters", 1000),
         "m_cm": ("meters", "centimeters", 100), "cm_mm": ("centimeters", "millimeters", 10)}


def unit_conversion(r: random.Random):
    # Decimal factors only: the answer appends or drops zeros, which a small model can learn.
    big, small, factor = UNITS[r.choice(sorted(UNITS))]
    value = r.randint(1, 60)
    if r.random() < 0.6:
        text = r.choice(["Convert {v} {b} to {s}.", "How many {s} are in {v} {b}?"])
        return _number("unit_conversion", text.format(v=value, b=big, s=small), value * factor)
    return _number("unit_conversion", f"Convert the quantity to {big}.", value, f"{value * factor} {small}")


def reverse_list(r: random.Random):
    items = r.sample(WORDS, r.randint(3, 4))
    instruction = r.choice(["Reverse the order of the list.", "Write the items in reverse order.", "List these items backwards."])
    return _exact("reverse_list", instruction, ", ".join(reversed(items)), ", ".join(items))


def sort_list(r: random.Random):
    # Three or four short items (words with different first letters, or single digits): the
    # order is then a fact about single tokens, which a small model already has.
    if r.random() < 0.5:
        wanted, items = r.randint(3, 4), []
        for word in r.sample(WORDS, len(WORDS)):
            if len(items) < wanted and word[0] not in {w[0] for w in items}:
                items.append(word)
        return _exact("sort_list", r.choice(["Sort the words alphabetically.", "Put these words in alphabetical order."]),
                      ", ".join(sorted(items)), ", ".join(items))
    numbers = r.sample(range(1, 10), r.randint(3, 4))
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


WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def dates(r: random.Random):
    # Calendar steps a small model can learn (weekday and month order, the next day), not
    # weekday-of-any-date, which needs a calendar computation.
    kind = r.random()
    if kind < 0.4:
        start, offset = r.randrange(7), r.randint(1, 2)
        span = (ONES[offset] if r.random() < 0.5 else str(offset)) + (" day" if offset == 1 else " days")
        text = r.choice(["What day of the week is {k} after {d}?", "If today is {d}, what day is it in {k}?"])
        return _exact("dates", text.format(k=span, d=WEEKDAYS[start]), WEEKDAYS[(start + offset) % 7])
    if kind < 0.7:
        month = r.randrange(12)
        if r.random() < 0.5:
            return _exact("dates", f"Which month comes right after {MONTHS[month]}?", MONTHS[(month + 1) % 12])
        return _exact("dates", f"Which month comes right before {MONTHS[month]}?", MONTHS[(month - 1) % 12])
    day = dt.date(2024, r.randint(1, 12), r.randint(1, 27))
    if r.random() < 0.5:
        return _exact("dates", "Give the date of the following day, as YYYY-MM-DD.", (day + dt.timedelta(days=1)).isoformat(),
                      day.isoformat())
    return _exact("dates", f"What date comes one day after {day.isoformat()}? Answer as YYYY-MM-DD.",
                  (day + dt.timedelta(days=1)).isoformat())


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


CATEGORIES = {"fruits": FRUITS, "animals": ANIMALS, "vegetables": VEGETABLES}


def filter_list(r: random.Random):
    # Two kinds of rule: a category (knowledge the model has) and a number comparison.
    if r.random() < 0.6:
        category, other = r.sample(sorted(CATEGORIES), 2)
        keep = r.sample([w for w in CATEGORIES[category] if w not in CATEGORIES[other]], r.randint(1, 2))
        drop = r.sample([w for w in CATEGORIES[other] if w not in CATEGORIES[category]], 2)
        items = keep + drop
        r.shuffle(items)
        kept = [w for w in items if w in keep]
        instruction = r.choice(["Keep only the {c} from the list, in their original order.", "List only the {c}, in the given order."])
        return _exact("filter_list", instruction.format(c=category), ", ".join(kept), ", ".join(items))
    numbers = r.sample(range(1, 60), r.randint(4, 5))
    rule, keep_number = r.choice([("greater than 30", lambda n: n > 30), ("less than 30", lambda n: n < 30)])
    if not any(keep_number(n) for n in numbers):
        numbers.append(45 if rule == "greater than 30" else 15)
    answer = ", ".join(str(n) for n in numbers if keep_number(n))
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
    """N unique records in blocks that hold one record of every family, each block in a seeded
    random order: any stretch of the file, so every split, has the families in equal shares."""
    if count < len(FAMILIES):
        raise UserError(f"builtin:{count}: ask for at least {len(FAMILIES)} examples (one per task family)")
    rng = random.Random(seed)
    records, block, seen = [], [], set()
    attempts = 0
    while len(records) + len(block) < count:
        family = FAMILIES[len(block)]
        record = family(rng)
        key = (record["instruction"], record["input"])
        attempts += 1
        if attempts > count * 50:
            raise UserError(f"builtin:{count}: cannot make that many distinct examples")
        if key in seen:
            continue
        seen.add(key)
        block.append(record)
        if len(block) == len(FAMILIES) or len(records) + len(block) == count:
            rng.shuffle(block)
            records.extend(block)
            block = []
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
