"""Prompt styles against the chapter's text, written out by hand from the book."""

from instructkit.data.prompts import ALPACA, GEMMA, PHI3, PromptStyle, get_prompt_style

WITH_INPUT = {"instruction": "Convert to passive voice.", "input": "The cat ate the fish.", "output": "The fish was eaten."}
NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


def test_alpaca_is_byte_identical_to_the_chapter():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nConvert to passive voice."
        "\n\n### Input:\nThe cat ate the fish."
        "\n\n### Response:\n"
    )
    assert ALPACA.prompt(WITH_INPUT) == expected
    assert ALPACA.training_text(WITH_INPUT) == expected + "The fish was eaten."


def test_alpaca_omits_the_input_block_when_input_is_empty_or_missing():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a primary color.\n\n### Response:\n"
    )
    assert ALPACA.prompt(NO_INPUT) == expected
    assert ALPACA.prompt({"instruction": "Name a primary color.", "output": "Red."}) == expected
    assert "### Input" not in ALPACA.format_input(NO_INPUT)


def test_phi3_matches_exercise_7_1():
    assert PHI3.training_text(WITH_INPUT) == (
        "<|user|>\nConvert to passive voice.\nThe cat ate the fish.\n<|assistant|>:\nThe fish was eaten."
    )
    assert PHI3.prompt(NO_INPUT) == "<|user|>\nName a primary color.\n<|assistant|>:\n"


def test_gemma_uses_its_turn_markers_and_ends_with_end_of_turn():
    assert GEMMA.prompt(WITH_INPUT) == (
        "<start_of_turn>user\nConvert to passive voice.\n\nThe cat ate the fish.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert GEMMA.end_marker == "<end_of_turn>"


def test_style_round_trips_through_its_saved_form():
    for name in ("alpaca", "phi3", "gemma"):
        style = get_prompt_style(name)
        assert PromptStyle.from_dict(style.to_dict()) == style


def test_a_single_user_message_renders_as_the_record_prompt():
    for name in ("alpaca", "phi3", "gemma"):
        style = get_prompt_style(name)
        for record in (WITH_INPUT, {"instruction": "Name a color.", "input": ""}):
            assert style.conversation([{"role": "user", "content": style.user_content(record)}]) == style.prompt(record)


def test_multi_turn_rule_with_a_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    # Gemma's own template: the system text opens the first user turn; answers close with <end_of_turn>.
    assert GEMMA.conversation(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    alpaca = get_prompt_style("alpaca")
    assert alpaca.conversation(messages) == (
        "Be brief.\n\n" + alpaca.prompt({"instruction": "Hi"}) + "Hello.\n\n" + alpaca.prompt({"instruction": "Bye"}))
    phi3 = get_prompt_style("phi3")
    assert phi3.conversation(messages) == "Be brief.\n\n<|user|>\nHi\n<|assistant|>:\nHello.\n\n<|user|>\nBye\n<|assistant|>:\n"


def test_malformed_conversations_are_one_line_errors():
    import pytest

    from instructkit.errors import UserError

    with pytest.raises(UserError, match="must end with a user message"):
        GEMMA.conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(UserError, match="message 1 has role 'user'; expected 'assistant'"):
        GEMMA.conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(UserError, match="at most one system message"):
        GEMMA.conversation([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                            {"role": "user", "content": "c"}])
