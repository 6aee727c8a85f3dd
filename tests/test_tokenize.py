"""Labels from spans: what is supervised, the end token, truncation."""

from instructkit.data.prompts import ALPACA
from instructkit.data.tokenize import IGNORE_INDEX, encode_example, encode_records

RECORD = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


def test_default_supervises_everything_and_ends_with_eos(gpt2):
    example, is_prefix = encode_example(RECORD, ALPACA, gpt2)
    assert is_prefix
    assert example.input_ids == gpt2.encode(ALPACA.training_text(RECORD)) + [gpt2.eos_id]
    assert example.labels == example.input_ids
    assert gpt2.decode(example.input_ids[example.response_start : -1]) == "Red."


def test_mask_instructions_supervises_response_and_end_only(gpt2):
    example, _ = encode_example(RECORD, ALPACA, gpt2, mask_instructions=True)
    supervised = [label for label in example.labels if label != IGNORE_INDEX]
    assert gpt2.decode(supervised[:-1]) == "Red." and supervised[-1] == gpt2.eos_id
    assert example.labels[: example.response_start] == [IGNORE_INDEX] * example.response_start


def test_straddling_token_is_counted_and_supervised(gpt2):
    # GPT-2's pre-tokenizer makes "\n\n" one token when the output starts with two newlines
    # (three in a row), so that token holds the prompt's last newline and the output's first.
    record = {"instruction": "x", "input": "", "output": "\n\nLine"}
    example, is_prefix = encode_example(record, ALPACA, gpt2, mask_instructions=True)
    assert not is_prefix
    supervised = [t for t in example.labels if t != IGNORE_INDEX]
    assert gpt2.decode(supervised[:-1]) == "\n\n\nLine"


def test_split_multibyte_character_starts_the_response_at_its_first_byte(gpt2):
    record = {"instruction": "Say hello in Spanish.", "input": "", "output": "\u00bfHola?"}
    example, is_prefix = encode_example(record, ALPACA, gpt2, mask_instructions=True)
    assert is_prefix
    assert gpt2.decode(example.input_ids[example.response_start : -1]) == "\u00bfHola?"


def test_truncation_reports_lost_end_tokens(gpt2):
    records = [RECORD, {"instruction": "Write a long answer.", "input": "", "output": "word " * 50}]
    examples, report = encode_records(records, ALPACA, gpt2, max_length=40)
    assert report.truncated == 1 and report.nothing_supervised == 0
    assert len(examples[1]) == 41 and examples[1].input_ids[-1] != gpt2.eos_id
    assert examples[0].input_ids[-1] == gpt2.eos_id


def test_control_tokens_of_the_tokenizer_in_data_are_one_line_errors():
    """Gemma's tokenizer has ~6,000 control tokens beyond the turn markers (<unused0>, <mask>,
    ...); any of them written in data is refused, naming the record."""
    import pytest

    from instructkit.data.prompts import GEMMA
    from instructkit.data.tokenize import encode_records
    from instructkit.errors import UserError
    from instructkit.models.registry import load_model

    tokenizer = load_model("tiny-gemma3").tokenizer
    assert {"<unused0>", "<unused6000>", "<mask>", "<eos>", "<start_of_turn>"} <= tokenizer.control_tokens
    good = {"instruction": "Compare <b>bold</b> and x < y > z.", "input": "", "output": "Fine."}
    encode_records([good], GEMMA, tokenizer)  # HTML-like text is not a control token
    bad = {"instruction": "Say it.", "input": "", "output": "Here <unused3> it is."}
    with pytest.raises(UserError, match=r"entry 1 \(instruction 'Say it.'\): field 'output' contains '<unused3>'"):
        encode_records([good, bad], GEMMA, tokenizer, source="d.json (train split)")
