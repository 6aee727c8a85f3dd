"""The chat page in a real browser: Debian's Chromium driven by Playwright, against a real server
on 127.0.0.1 (a tiny fine-tuned run, with its base model beside it for compare mode)."""

import json
from urllib.parse import urlparse

import pytest

from .conftest import REPO, require_module, require_program, run_cli
from .serve_helpers import running_server

playwright_api = require_module("playwright.sync_api")

# Flags for Chromium on this closed network (shared/FINDINGS.md): without the background-networking
# ones it keeps opening connections that the machine refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def served(tmp_path_factory, chapter_data_path):
    run = tmp_path_factory.mktemp("page") / "tiny-run"
    result = run_cli("finetune", "--model", "tiny-gemma3", "--data", str(chapter_data_path), "--out", str(run),
                     "--max-steps", "2", "--eval-batches", "1", "--no-sample")
    assert result.returncode == 0, result.stderr[-2000:]
    with running_server("--run", str(run), "--compare-base", "--threads", "2") as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = require_program("chromium", "Debian's chromium package; .ci/run installs it")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served):
    context = browser.new_context()
    page = context.new_page()
    page.requests, page.dialogs = [], []
    page.on("request", lambda request: page.requests.append(request))
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    response = page.goto(served)
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    page.wait_for_selector("#model option", state="attached")
    yield page
    assert all(urlparse(r.url).hostname == "127.0.0.1" for r in page.requests), [r.url for r in page.requests]
    context.close()


def _open_settings(page):
    if not page.evaluate("document.getElementById('settings').open"):
        page.click("#settings > summary")  # as a person would: the settings start folded


def _send(page, text, max_tokens=40):
    _open_settings(page)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#message", text)
    page.click("#send")


def _wait_done(page, count):
    """Until `count` answers have finished (locators and expect run in Playwright's own isolated
    world; the page's strict CSP forbids the string evaluation that wait_for_function needs)."""
    page.locator(".message.assistant[data-done='true']").nth(count - 1).wait_for()


def _last_answers(page):
    return page.locator(".message.assistant")


def test_an_answer_streams_in_and_history_reaches_the_server(page):
    _send(page, "Hello there", 40)
    page.wait_for_selector(".message.assistant[data-done='true']")
    first = _last_answers(page).first
    assert int(first.get_attribute("data-updates")) > 1  # it grew in several steps, not at once
    assert first.locator(".text").text_content().strip()
    _send(page, "And a second question", 10)
    _wait_done(page, 2)
    posts = [json.loads(r.post_data) for r in page.requests if r.url.endswith("/v1/chat/completions")]
    roles = [m["role"] for m in posts[-1]["messages"]]
    assert roles == ["user", "assistant", "user"] and posts[-1]["messages"][1]["content"] == \
        first.locator(".text").text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)


def test_stop_ends_a_slow_answer_and_the_next_one_works(page):
    _send(page, "Tell me a long story", 450)
    while int(page.locator(".message.assistant").first.get_attribute("data-updates") or 0) < 3:
        page.wait_for_timeout(20)
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-finish='stopped']")
    playwright_api.expect(page.locator("#stop")).to_be_disabled()
    _send(page, "Short one", 5)
    _wait_done(page, 2)
    assert _last_answers(page).nth(1).get_attribute("data-finish") in ("length", "stop")


def test_model_text_is_shown_as_text_never_as_html(page):
    attack = "<img src=x onerror=alert(1)>"
    _send(page, attack, 5)
    page.wait_for_selector(".message.assistant[data-done='true']")
    assert page.locator(".message.user .text").first.text_content() == attack
    assert page.locator("#columns img").count() == 0 and page.dialogs == []


def test_an_error_shows_in_an_alert(page):
    _open_settings(page)
    page.fill("#max-tokens", "0")
    page.fill("#message", "Hi")
    page.click("#send")
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "HTTP 422" in alert.text_content() and "max_tokens" in alert.text_content()


def test_compare_mode_shows_the_base_and_the_fine_tuned_answer(page):
    page.check("#compare")
    assert page.locator(".column").count() == 2
    assert {page.locator(".column h2").nth(i).text_content().split(" (")[1] for i in range(2)} == {"base)", "fine-tuned)"}
    _send(page, "Name a fruit.", 12)
    _wait_done(page, 2)
    posts = {json.loads(r.post_data)["model"] for r in page.requests if r.url.endswith("/v1/chat/completions")}
    assert posts == {"tiny-run", "tiny-gemma3"}
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page-compare.png"), full_page=True)


@pytest.fixture(scope="module")
def served_smollm2():
    # Exact fp32 decoding (no int8, no compiled step), so the test can compute the same answer.
    with running_server("--model", "smollm2-135m-instruct", "--quantize", "none", "--compile", "off",
                        "--threads", "2") as (url, _, _):
        yield url


def test_history_reaches_smollm2_through_its_own_template(browser, served_smollm2):
    """A real model behind the page: the second answer is SmolLM2's greedy answer to the whole
    conversation rendered by its own ChatML template (computed here with the library), which
    differs from its answer to the last question alone."""
    from instructkit.data.prompts import resolve_prompt_style
    from instructkit.decode.generate import generate
    from instructkit.models.registry import load_model
    from instructkit.serve.conversation import encode_conversation

    context = browser.new_context()
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request))
    page.goto(served_smollm2)
    page.wait_for_selector("#model option", state="attached")
    _open_settings(page)
    page.fill("#temperature", "0")
    _send(page, "Hi! My name is Ada.", 24)
    _wait_done(page, 1)
    _send(page, "What is my name?", 16)
    _wait_done(page, 2)
    shown = _last_answers(page).nth(1).locator(".text").text_content()
    messages = [json.loads(r.post_data) for r in page.requests if r.url.endswith("/v1/chat/completions")][-1]["messages"]
    context.close()
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]

    loaded = load_model("smollm2-135m-instruct")
    style, tokenizer = resolve_prompt_style("model", loaded), loaded.tokenizer

    def answer(conversation):
        ids = encode_conversation(style, conversation, tokenizer)
        return generate(loaded.model, tokenizer, [ids], max_new_tokens=16, stop_ids=style.stop_ids(tokenizer))[0].text

    assert tokenizer.decode(encode_conversation(style, messages, tokenizer)).count("<|im_start|>") == 5  # system, 3 turns, prompt
    assert shown.strip() == answer(messages).strip()
    assert shown.strip() != answer(messages[-1:]).strip()
