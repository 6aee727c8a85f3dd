"""The task families of the built-in dataset: what each one asks, how it is worded, and the
one-line rules a model could use to look right without knowing the answer.

A family separates the *question* from its *wording*. `draw(rng)` picks the underlying question
as a small tuple (the operands, the word, the date and offset, the list contents...), which is
the record's semantic key: two records with the same key ask the same thing, however they are
phrased. `render(question, rng)` writes one record for it in one of several phrasings. The
dataset generator (builtin.py) keeps every key inside one split, so no test question is a
training question in other words.

`rules` are the cheap baselines reported beside the models: answers a one-line heuristic would
give (always "1", copy the input, "add -s"...). They show how much of a family a prior solves.
Targets are short, unambiguous and grammatical, pitched where Gemma 3 270M can learn them in one
epoch (measured: few-shot, it computes 5 + 1 = 6 but not 3 + 3, so arithmetic is one more or one
fewer).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "coins", "cards"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "garden", "window", "rocket", "candle",
         "forest", "bottle", "dragon", "island", "jacket", "kettle", "ladder", "magnet", "needle", "orange", "pepper",
         "rabbit", "saddle", "tomato", "violin", "walnut", "yogurt", "zebra", "anchor", "bridge", "castle"]
# Words for letter counting, chosen so that counts of 1, 2 and 3 are all common.
LETTER_WORDS = ["banana", "bubble", "pepper", "papaya", "mammal", "tattoo", "puppy", "daddy", "cinnamon", "assistant",
                "letter", "coffee", "balloon", "dessert", "kayak", "level", "radar", "teeth", "address", "summer",
                "rabbit", "apple", "garden", "window", "rocket", "candle", "forest", "island", "violin", "yellow"]
FRUITS = ["apple", "pear", "banana", "cherry", "mango", "plum", "peach", "grape", "lemon", "kiwi", "melon", "apricot"]
VEGETABLES = ["carrot", "potato", "onion", "leek", "celery", "spinach", "turnip", "cabbage", "radish", "lettuce"]
ANIMALS = ["dog", "cat", "horse", "rabbit", "goat", "sheep", "tiger", "zebra", "camel", "otter", "fox", "mouse"]
CATEGORIES = {"fruit": FRUITS, "vegetable": VEGETABLES, "animal": ANIMALS}
# Plurals that "add -s" gets wrong make up most of the family, so that rule stays a weak baseline.
PLURALS = {
    # irregular
    "child": "children", "mouse": "mice", "goose": "geese", "man": "men", "woman": "women", "tooth": "teeth",
    "foot": "feet", "person": "people", "ox": "oxen", "cactus": "cacti", "crisis": "crises", "criterion": "criteria",
    "fungus": "fungi", "sheep": "sheep", "deer": "deer",
    # -es
    "box": "boxes", "bus": "buses", "dish": "dishes", "church": "churches", "fox": "foxes", "glass": "glasses",
    "watch": "watches", "brush": "brushes", "wish": "wishes", "bench": "benches", "lunch": "lunches",
    "beach": "beaches", "hero": "heroes", "potato": "potatoes", "tomato": "tomatoes",
    # -ies
    "city": "cities", "baby": "babies", "story": "stories", "lady": "ladies", "party": "parties", "berry": "berries",
    "puppy": "puppies", "family": "families", "country": "countries", "army": "armies",
    # -ves
    "leaf": "leaves", "wolf": "wolves", "knife": "knives", "wife": "wives", "life": "lives", "half": "halves",
    "shelf": "shelves", "loaf": "loaves", "thief": "thieves",
    # -s
    "cat": "cats", "key": "keys", "day": "days", "toy": "toys", "monkey": "monkeys", "boy": "boys",
}
# A correct word, its usual misspelling, and sentences in which the word is used correctly.
SPELLING = [
    ("receive", "recieve", ["Did you receive my letter?", "I hope to receive an answer soon.", "We did not receive the parcel."]),
    ("separate", "seperate", ["Keep the two piles separate.", "They live in separate houses.", "Wash the colors in a separate load."]),
    ("definitely", "definately", ["I will definitely come tomorrow.", "That was definitely the right choice.", "It will definitely rain today."]),
    ("necessary", "neccessary", ["Is it necessary to book a table?", "Water is necessary for life.", "Only take what is necessary."]),
    ("occasion", "ocassion", ["We dressed up for the occasion.", "A birthday is a special occasion.", "He wore a suit for the occasion."]),
    ("beginning", "begining", ["The beginning of the film was slow.", "This is only the beginning.", "Start reading from the beginning."]),
    ("believe", "beleive", ["I believe you are right.", "Do you believe in luck?", "They believe the story is true."]),
    ("tomorrow", "tommorow", ["The shop opens tomorrow.", "We will talk tomorrow.", "My aunt arrives tomorrow."]),
    ("address", "adress", ["Please write your address here.", "What is your new address?", "Send the card to this address."]),
    ("calendar", "calender", ["Mark the date on the calendar.", "The calendar hangs in the kitchen.", "The new calendar starts in January."]),
    ("government", "goverment", ["The government passed a new law.", "She works for the government.", "The government built a new road."]),
    ("library", "libary", ["I borrowed a book from the library.", "The library closes at six.", "The library has many old maps."]),
    ("weird", "wierd", ["That was a weird dream.", "The room smelled weird.", "He made a weird noise."]),
    ("friend", "freind", ["My friend lives next door.", "She called her best friend.", "A friend helped me move."]),
    ("because", "becuase", ["I stayed home because it rained.", "We left early because we were tired.", "The game stopped because of the storm."]),
    ("until", "untill", ["Wait until the bell rings.", "The shop is open until noon.", "Stay here until I return."]),
    ("across", "accross", ["They swam across the river.", "The bank is across the street.", "A bird flew across the sky."]),
    ("environment", "enviroment", ["We must protect the environment.", "Plants need a healthy environment.", "The new office is a quiet environment."]),
]
KEYS = ["name", "city", "age", "color", "country", "job"]
VALUES = {"name": NAMES, "city": ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Dakar"],
          "age": [str(n) for n in range(18, 80)], "color": ["red", "blue", "green", "black", "white"],
          "country": ["Peru", "Chad", "Fiji", "Laos", "Oman", "Togo"], "job": ["baker", "nurse", "pilot", "judge", "chef"]}
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
UNITS = {"km_m": ("kilometers", "meters", 1000), "kg_g": ("kilograms", "grams", 1000),
         "l_ml": ("liters", "milliliters", 1000), "m_cm": ("meters", "centimeters", 100),
         "cm_mm": ("centimeters", "millimeters", 10)}

Question = tuple
Rule = tuple[str, Callable[[dict], str]]


@dataclass(frozen=True)
class Family:
    name: str
    draw: Callable[[random.Random], Question]  # the underlying question: the semantic key
    render: Callable[[Question, random.Random], dict]  # one phrasing of it, as a record
    rules: tuple[Rule, ...] = ()


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _record(instruction: str, output: str, check: dict, input_text: str = "") -> dict:
    return {"instruction": instruction, "input": input_text, "output": output, "check": check}


def _exact(instruction: str, answer: str, input_text: str = "") -> dict:
    return _record(instruction, answer, {"type": "exact", "answer": answer}, input_text)


def _number(instruction: str, value: int, input_text: str = "") -> dict:
    return _record(instruction, str(value), {"type": "number", "answer": value, "tolerance": 1e-6}, input_text)


def _numbers_in(record: dict) -> list[str]:
    return re.findall(r"\d+", record["instruction"] + " " + record["input"])


def _first_number(record: dict) -> str:
    found = _numbers_in(record)
    return found[0] if found else ""


def _copy_input(record: dict) -> str:
    return record["input"]


def _items(record: dict) -> list[str]:
    return [item.strip() for item in record["input"].split(",")]


COPY_INPUT: Rule = ("copy the input", _copy_input)


# arithmetic: one more or one fewer of a count up to 50 -------------------------------------------
def _arithmetic_draw(r: random.Random) -> Question:
    return ("add", r.randint(1, 49)) if r.random() < 0.5 else ("sub", r.randint(2, 50))


def _arithmetic_render(q: Question, r: random.Random) -> dict:
    op, a = q
    name, item, one = r.choice(NAMES), r.choice(ITEMS), r.choice(["one", "1"])
    if op == "add":
        text = r.choice(["{n} has {a} {i} and gets {one} more. How many {i} does {n} have now?",
                         "{n} had {a} {i}. A friend gave {n} {one} more. How many {i} does {n} have?"])
    else:
        text = r.choice(["{n} has {a} {i} and gives away {one}. How many {i} are left?",
                         "There were {a} {i}. {n} took {one}. How many {i} remain?"])
    answer = a + 1 if op == "add" else a - 1
    problem = text.format(n=name, a=a, one=one, i=item)
    if r.random() < 0.3:  # the problem as input, with a generic instruction
        return _number(r.choice(["Solve the word problem.", "Answer with a number."]), answer, problem)
    return _number(problem, answer)


# unit conversion with decimal factors -----------------------------------------------------------
def _units_draw(r: random.Random) -> Question:
    return (r.choice(sorted(UNITS)), r.randint(1, 60), r.choice(["down", "up"]))


def _units_render(q: Question, r: random.Random) -> dict:
    units, value, direction = q
    big, small, factor = UNITS[units]
    if direction == "down":
        text = r.choice(["Convert {v} {b} to {s}.", "How many {s} are in {v} {b}?"])
        return _number(text.format(v=value, b=big, s=small), value * factor)
    return _number(r.choice([f"Convert the quantity to {big}.", f"Express this in {big}."]), value,
                   f"{value * factor} {small}")


# list tasks -------------------------------------------------------------------------------------
def _reverse_draw(r: random.Random) -> Question:
    return tuple(r.sample(WORDS, r.randint(3, 4)))


def _reverse_render(q: Question, r: random.Random) -> dict:
    instruction = r.choice(["Reverse the order of the list.", "Write the items in reverse order.", "List these items backwards."])
    return _exact(instruction, ", ".join(reversed(q)), ", ".join(q))


def _sort_draw(r: random.Random) -> Question:
    """Three or four words with different first letters, or single digits, as a sorted tuple
    (the same set in another order is the same question)."""
    if r.random() < 0.5:
        wanted, items = r.randint(3, 4), []
        for word in r.sample(WORDS, len(WORDS)):
            if len(items) < wanted and word[0] not in {w[0] for w in items}:
                items.append(word)
        return ("words", *sorted(items))
    return ("numbers", *sorted(r.sample(range(1, 10), r.randint(3, 4))))


def _sort_render(q: Question, r: random.Random) -> dict:
    kind, *items = q
    shown = list(items)
    while shown == sorted(shown):  # never already in order: "copy the input" must not be the answer
        r.shuffle(shown)
    answer = ", ".join(map(str, items))
    if kind == "words":
        instruction = r.choice(["Sort the words alphabetically.", "Put these words in alphabetical order."])
    else:
        instruction = r.choice(["Sort the numbers from smallest to largest.", "Arrange the numbers in ascending order."])
    return _exact(instruction, answer, ", ".join(map(str, shown)))


def _filter_draw(r: random.Random) -> Question:
    if r.random() < 0.6:  # a category rule (knowledge the model has)
        category, other = r.sample(sorted(CATEGORIES), 2)
        keep = r.sample([w for w in CATEGORIES[category] if w not in CATEGORIES[other]], r.randint(1, 2))
        drop = r.sample([w for w in CATEGORIES[other] if w not in CATEGORIES[category]], 2)
        items = keep + drop
        r.shuffle(items)
        return ("category", category, *items)
    rule = r.choice(["greater", "less"])
    numbers = r.sample(range(1, 60), r.randint(4, 5))
    keep = (lambda n: n > 30) if rule == "greater" else (lambda n: n < 30)
    if not any(keep(n) for n in numbers) or all(keep(n) for n in numbers):
        numbers[0] = 45 if rule == "greater" else 15
        numbers[-1] = 15 if rule == "greater" else 45
    return ("number", rule, *numbers)


def _filter_render(q: Question, r: random.Random) -> dict:
    if q[0] == "category":
        _, category, *items = q
        kept = [w for w in items if w in CATEGORIES[category]]
        plural = {"fruit": "fruits", "vegetable": "vegetables", "animal": "animals"}[category]
        instruction = r.choice(["Keep only the {c} from the list, in their original order.", "List only the {c}, in the given order."])
        return _exact(instruction.format(c=plural), ", ".join(kept), ", ".join(items))
    _, rule, *numbers = q
    keep = (lambda n: n > 30) if rule == "greater" else (lambda n: n < 30)
    words = "greater than 30" if rule == "greater" else "less than 30"
    return _exact(f"Keep only the numbers that are {words}, in their original order.",
                  ", ".join(str(n) for n in numbers if keep(n)), ", ".join(map(str, numbers)))


def _odd_draw(r: random.Random) -> Question:
    group, other = r.sample(sorted(CATEGORIES), 2)
    items = r.sample(CATEGORIES[group], 3)
    odd = r.choice([w for w in CATEGORIES[other] if w not in CATEGORIES[group]])
    items.insert(r.randint(0, 3), odd)
    return (group, *items)


def _odd_render(q: Question, r: random.Random) -> dict:
    group, *items = q
    odd = next(w for w in items if w not in CATEGORIES[group])
    label = {"fruit": "a fruit", "vegetable": "a vegetable", "animal": "an animal"}[group]
    instruction = r.choice([f"Which item is not {label}?", f"Name the one item in the list that is not {label}."])
    return _exact(instruction, odd, ", ".join(items))


# counting ---------------------------------------------------------------------------------------
def _count_draw(r: random.Random) -> Question:
    if r.random() < 0.5:
        return ("words", *r.sample(WORDS, r.randint(3, 8)))
    wanted = r.choice([1, 2, 3])  # the count first, so 1, 2 and 3 are equally common
    pairs = [(w, ch) for w in LETTER_WORDS for ch in sorted(set(w)) if w.count(ch) == wanted]
    return ("letter", *r.choice(pairs))


def _count_render(q: Question, r: random.Random) -> dict:
    if q[0] == "words":
        words = q[1:]
        return _number(r.choice(["How many words are in the following text?", "Count the words."]), len(words), " ".join(words))
    _, word, letter = q
    text = r.choice(["How many times does the letter '{l}' appear in the word '{w}'?",
                     "Count how often the letter '{l}' occurs in '{w}'."])
    return _number(text.format(l=letter, w=word), word.count(letter))


# text transformations ---------------------------------------------------------------------------
def _case_draw(r: random.Random) -> Question:
    return (r.choice(["upper", "title", "lower"]), *r.sample(WORDS, r.randint(2, 4)))


def _case_render(q: Question, r: random.Random) -> dict:
    style, *words = q
    text = " ".join(words)
    shown = text.title() if style == "lower" else text
    answer = {"upper": text.upper(), "title": text.title(), "lower": text.lower()}[style]
    instruction = r.choice({"upper": ["Convert the text to uppercase.", "Write this in capital letters."],
                            "title": ["Convert the text to title case.", "Capitalize the first letter of each word."],
                            "lower": ["Convert the text to lowercase.", "Write this in small letters only."]}[style])
    return _record(instruction, answer, {"type": "exact_case", "answer": answer}, shown)


def _plural_draw(r: random.Random) -> Question:
    return (r.choice(sorted(PLURALS)),)


def _plural_render(q: Question, r: random.Random) -> dict:
    noun = q[0]
    if r.random() < 0.5:
        template = r.choice(["What is the plural of '{n}'?", "Write the plural form of '{n}'."])
        return _exact(template.format(n=noun), PLURALS[noun])
    return _exact(r.choice(["Give the plural form of the noun.", "Make the noun plural."]), PLURALS[noun], noun)


def _add_s(record: dict) -> str:
    noun = record["input"] or re.search(r"'([^']+)'", record["instruction"]).group(1)
    return noun + "s"


def _number_words_draw(r: random.Random) -> Question:
    return (r.randint(0, 999),)


def _number_words_render(q: Question, r: random.Random) -> dict:
    n = q[0]
    if r.random() < 0.5:
        return _exact(r.choice([f"Write the number {n} in words.", f"How do you write {n} in English words?"]), number_words(n))
    return _exact("Spell out the number in English words.", number_words(n), str(n))


def _spelling_draw(r: random.Random) -> Question:
    index = r.randrange(len(SPELLING))
    return (SPELLING[index][0], r.randrange(len(SPELLING[index][2])))


def _spelling_render(q: Question, r: random.Random) -> dict:
    word, sentence_index = q
    _, wrong, sentences = next(entry for entry in SPELLING if entry[0] == word)
    right_sentence = sentences[sentence_index]
    instruction = r.choice(["Fix the spelling mistake in the sentence.", "Correct the misspelled word."])
    return _exact(instruction, right_sentence, right_sentence.replace(word, wrong, 1))


# dates ------------------------------------------------------------------------------------------
def _dates_draw(r: random.Random) -> Question:
    kind = r.random()
    if kind < 0.35:
        return ("weekday", r.randrange(7), r.randint(1, 3))
    if kind < 0.65:
        return ("month", r.randrange(12), r.choice(["after", "before"]))
    year, month = r.choice([2023, 2024, 2025]), r.randint(1, 12)
    last = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
    day = last if r.random() < 0.35 else r.randint(1, last - 1)  # month ends are a third of these
    return ("next_day", dt.date(year, month, day).isoformat())


def _dates_render(q: Question, r: random.Random) -> dict:
    if q[0] == "weekday":
        _, start, offset = q
        span = (ONES[offset] if r.random() < 0.5 else str(offset)) + (" day" if offset == 1 else " days")
        text = r.choice(["What day of the week is {k} after {d}?", "If today is {d}, what day will it be in {k}?"])
        return _exact(text.format(k=span, d=WEEKDAYS[start]), WEEKDAYS[(start + offset) % 7])
    if q[0] == "month":
        _, month, direction = q
        answer = MONTHS[(month + (1 if direction == "after" else -1)) % 12]
        text = r.choice([f"Which month comes right {direction} {MONTHS[month]}?", f"Name the month just {direction} {MONTHS[month]}."])
        return _exact(text, answer)
    day = dt.date.fromisoformat(q[1])
    answer = (day + dt.timedelta(days=1)).isoformat()
    if r.random() < 0.5:
        return _exact("Give the date of the following day, as YYYY-MM-DD.", answer, day.isoformat())
    return _exact(f"What date comes one day after {day.isoformat()}? Answer as YYYY-MM-DD.", answer)


def _day_plus_one_no_carry(record: dict) -> str:
    found = re.search(r"(\d{4})-(\d{2})-(\d{2})", record["instruction"] + " " + record["input"])
    if not found:
        return _echo_name(record)
    return f"{found.group(1)}-{found.group(2)}-{int(found.group(3)) + 1:02d}"


def _echo_name(record: dict) -> str:
    text = record["instruction"] + " " + record["input"]
    names = [w for w in WEEKDAYS + MONTHS if w in text]
    return names[0] if names else ""


# structured data --------------------------------------------------------------------------------
def _json_extract_draw(r: random.Random) -> Question:
    keys = r.sample(KEYS, r.randint(3, 4))
    pairs = tuple((k, r.choice(VALUES[k])) for k in keys)
    return (r.choice(keys), *pairs)


def _json_extract_render(q: Question, r: random.Random) -> dict:
    key, *pairs = q
    template = r.choice(["What is the value of the field '{k}' in this JSON?", "Extract the '{k}' field from the JSON object.",
                         "From the JSON below, give the value of '{k}'."])
    return _exact(template.format(k=key), dict(pairs)[key], json.dumps(dict(pairs)))


def _first_json_value(record: dict) -> str:
    try:
        return str(next(iter(json.loads(record["input"]).values())))
    except (json.JSONDecodeError, StopIteration, AttributeError):
        return ""


def _to_json_draw(r: random.Random) -> Question:
    return tuple((k, r.choice(VALUES[k])) for k in r.sample(KEYS, r.randint(2, 3)))


def _to_json_render(q: Question, r: random.Random) -> dict:
    obj = dict(q)
    text = "; ".join(f"{k}: {v}" for k, v in obj.items())
    instruction = r.choice(["Turn the key-value pairs into a JSON object with string values.",
                            "Convert this to JSON (all values as strings)."])
    return _record(instruction, json.dumps(obj), {"type": "json", "answer": obj}, text)


# classification ---------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _classify_draw(r: random.Random) -> Question:
    if r.random() < 0.5:
        want_prime = r.random() < 0.5  # primes are rarer than composites: draw the class first
        return ("number", r.choice([n for n in range(2, 100) if _is_prime(n) == want_prime]))
    category = r.choice(sorted(CATEGORIES))
    return ("category", r.choice(CATEGORIES[category]))


def _classify_render(q: Question, r: random.Random) -> dict:
    if q[0] == "number":
        n = q[1]
        text = r.choice([f"Is {n} a prime or a composite number? Answer with one word.",
                         f"Answer with prime or composite: which is {n}?"])
        return _exact(text, "prime" if _is_prime(n) else "composite")
    word = q[1]
    category = next(name for name, members in CATEGORIES.items() if word in members)
    text = r.choice([f"Is a {word} a fruit, a vegetable or an animal? Answer with one word.",
                     f"Which group does '{word}' belong to: fruit, vegetable or animal?"])
    return _exact(text, category)


def _odd_not_five_is_prime(record: dict) -> str:
    number = _first_number(record)
    if not number:
        return "fruit"
    n = int(number)
    return "prime" if n % 2 and n % 5 else "composite"


FAMILIES: tuple[Family, ...] = (
    Family("arithmetic", _arithmetic_draw, _arithmetic_render, (("echo the first number", _first_number),)),
    Family("unit_conversion", _units_draw, _units_render, (("echo the first number", _first_number),)),
    Family("reverse_list", _reverse_draw, _reverse_render, (COPY_INPUT,)),
    Family("sort_list", _sort_draw, _sort_render, (COPY_INPUT,)),
    Family("count", _count_draw, _count_render, (("always 1", lambda record: "1"), ("always 3", lambda record: "3"))),
    Family("case", _case_draw, _case_render, (COPY_INPUT,)),
    Family("plural", _plural_draw, _plural_render, (("add -s", _add_s),)),
    Family("number_words", _number_words_draw, _number_words_render, (("echo the first number", _first_number),)),
    Family("dates", _dates_draw, _dates_render,
           (("day + 1 without carry", _day_plus_one_no_carry), ("echo the named day or month", _echo_name))),
    Family("json_extract", _json_extract_draw, _json_extract_render, (("first value", _first_json_value),)),
    Family("to_json", _to_json_draw, _to_json_render, (COPY_INPUT,)),
    Family("filter_list", _filter_draw, _filter_render, (COPY_INPUT, ("first item", lambda record: _items(record)[0]))),
    Family("spelling", _spelling_draw, _spelling_render, (COPY_INPUT,)),
    Family("odd_one_out", _odd_draw, _odd_render,
           (("first item", lambda record: _items(record)[0]), ("last item", lambda record: _items(record)[-1]))),
    Family("classify", _classify_draw, _classify_render, (("odd and not ending in 5 is prime", _odd_not_five_is_prime),)),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
