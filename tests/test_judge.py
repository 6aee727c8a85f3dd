"""The LLM judge against a real llama.cpp server, plus stand-ins for faults and for Ollama."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import scipy.stats

from instructkit.evaluate.evaluation import agreement, load_scores
from instructkit.evaluate.judge import JudgeConfig, chapter_prompt, judge_responses, parse_score
from instructkit.errors import UserError
from instructkit.models.registry import embedded_gguf_path

from .conftest import require_module, run_cli
from .judge_servers import counting_proxy, llama_cpp_server, ollama_stand_in, scripted_openai_server

require_module("llama_cpp")


@pytest.fixture(scope="module")
def llama_server():
    with llama_cpp_server(embedded_gguf_path()) as url:
        yield url


@pytest.fixture(scope="module")
def entries(chapter_data_path):
    return json.loads((chapter_data_path.parent / "instruction-data-with-response.json").read_text())


def test_chapter_prompt_word_for_word():
    entry = {"instruction": "Name a color.", "input": "", "output": "Red."}
    assert chapter_prompt(entry, "Blue.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Red.`, score the model "
        "response `Blue.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )


@pytest.mark.parametrize("reply, score", [("85", 85), (" 100\n", 100), ("0", 0), ("101", None), ("Score: 80", None),
                                           ("80/100", None), ("eighty", None), ("", None), ("-5", None)])
def test_strict_parsing(reply, score):
    assert parse_score(reply, 0, 100) == score


def test_real_llama_cpp_server_end_to_end_with_cache(llama_server, entries, tmp_path):
    config = JudgeConfig(url=llama_server, model="gemma", api="openai", concurrency=2, timeout=120)
    cache = tmp_path / "cache.jsonl"
    sample = entries[:6] + [{**entries[6], "model_response": ""}]
    verdicts = judge_responses(sample, config, cache, progress=False)
    assert [v.index for v in verdicts] == list(range(7))
    assert verdicts[6].score == 0 and verdicts[6].reply == ""  # empty response: 0, never asked
    assert all(v.status in ("scored", "unparsed") for v in verdicts[:6])
    assert all(v.reply is not None for v in verdicts)  # every reply kept, parsed or not
    assert len(cache.read_text().splitlines()) == 6
    # A rerun asks nothing: it works even with the server gone.
    offline = JudgeConfig(url="http://127.0.0.1:9", model="gemma", api="openai")
    again = judge_responses(sample, offline, cache, progress=False)
    assert [(v.score, v.reply) for v in again] == [(v.score, v.reply) for v in verdicts]
    assert all(v.cached for v in again[:6])


def test_request_format_through_a_counting_proxy(llama_server, entries, tmp_path):
    with counting_proxy(llama_server) as proxy:
        config = JudgeConfig(url=proxy.url, model="gemma", api="openai", concurrency=1, timeout=120)
        judge_responses(entries[:2], config, tmp_path / "c.jsonl", progress=False)
        body = proxy.requests[0]
    assert body["model"] == "gemma" and body["temperature"] == 0 and body["seed"] == 123
    assert body["messages"] == [{"role": "user", "content": chapter_prompt(entries[0], entries[0]["model_response"])}]


def test_killed_evaluation_resumes_asking_only_the_missing_entries(llama_server, entries, tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:10], indent=4))
    with counting_proxy(llama_server) as proxy:
        args = ["evaluate", "--responses", str(responses), "--judge-url", proxy.url, "--judge-model", "gemma",
                "--judge-api", "openai", "--judge-concurrency", "1", "--judge-timeout", "120"]
        process = subprocess.Popen([sys.executable, "-m", "instructkit", *args],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = tmp_path / "judge-cache.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 4):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        answered = len(cache.read_text().splitlines())
        assert 4 <= answered < 10, "the run was not killed halfway"
        asked_before = len(proxy.requests)
        result = run_cli(*args)
        assert len(proxy.requests) - asked_before == 10 - answered
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    judge = evaluation["judge"]
    assert judge["scored"] + len(judge["unparsed"]) + len(judge["failed"]) == 10
    # The Gemma base model mostly echoes the prompt instead of a score (FINDINGS.md): a judge that
    # scores nothing fails the evaluation, after writing its report; either way the run finished.
    assert result.returncode == {"ok": 0, "warning": 0, "failed": 1}[judge["status"]], result.stderr
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()


def test_faults_are_retried_or_counted(entries, tmp_path):
    """Stand-in server: llama.cpp cannot be told to fail; this one fails on a script."""

    def script(n, body):
        prompt = body["messages"][0]["content"]
        if entries[0]["instruction"] in prompt:  # 500 twice, then a score: retried and scored
            return ("status", 500) if n <= 2 else ("reply", "70")
        if entries[1]["instruction"] in prompt:
            return ("reply", "I think it deserves 7 out of 10")  # garbage: counted as unparsed
        if entries[2]["instruction"] in prompt:
            return ("status", 500)  # always failing: counted as failed
        if entries[3]["instruction"] in prompt:
            return ("hang", 3)  # past the timeout
        return ("drop", None)  # connection dropped

    with scripted_openai_server(script) as server:
        config = JudgeConfig(url=server.url, model="m", api="openai", concurrency=1, timeout=0.5, retries=2)
        verdicts = judge_responses(entries[:5], config, tmp_path / "c.jsonl", progress=False)
    assert [v.status for v in verdicts] == ["scored", "unparsed", "failed", "failed", "failed"]
    assert verdicts[0].score == 70 and verdicts[1].reply.startswith("I think")
    assert "HTTP 500" in verdicts[2].error
    # Failures are not cached, so a rerun asks for them again.
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2


def test_ollama_native_stream(entries, tmp_path):
    """Ollama itself cannot be installed here; the stand-in replays its documented NDJSON stream."""
    with ollama_stand_in(lambda body: ["4", "2"]) as server:
        config = JudgeConfig(url=server.url, model="llama3", api="ollama", concurrency=1)
        verdicts = judge_responses(entries[:2], config, tmp_path / "c.jsonl", progress=False)
        request = server.requests[0]
    assert [v.score for v in verdicts] == [42, 42]
    assert request["path"] == "/api/chat" and request["stream"] is True
    # num_predict bounds the reply, as max_tokens does for OpenAI servers: a judge that rambles stops.
    assert request["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048, "num_predict": 16}


def test_ollama_stream_that_errors_or_stops_early_is_a_failure_never_cached(entries, tmp_path):
    """Ollama stand-in: a stream ending in an error chunk, and one cut off before done: true."""
    plans = {entries[0]["instruction"]: {"pieces": ["8", "0"], "end": "error"},
             entries[1]["instruction"]: {"pieces": ["6"], "end": "cut"},
             entries[2]["instruction"]: ["7", "5"]}

    def plan_for(body):
        prompt = body["messages"][0]["content"]
        return next(plan for instruction, plan in plans.items() if instruction in prompt)

    cache = tmp_path / "c.jsonl"
    with ollama_stand_in(plan_for) as server:
        config = JudgeConfig(url=server.url, model="llama3", api="ollama", concurrency=1, retries=1)
        verdicts = judge_responses(entries[:3], config, cache, progress=False)
    assert [v.status for v in verdicts] == ["failed", "failed", "scored"]
    assert "error" in verdicts[0].error and "without done" in verdicts[1].error
    assert [json.loads(line)["reply"] for line in cache.read_text().splitlines()] == ["75"]


@pytest.mark.parametrize("status, words", [(401, "refused the request (HTTP 401"), (404, "HTTP 404: model 'x' not found")])
def test_configuration_faults_stop_at_once_with_one_line(entries, tmp_path, status, words):
    """Stand-in: a server answering every request with the same client error (no retries)."""
    with scripted_openai_server(lambda n, body: ("status", (status, {"error": {"message": "model 'x' not found"}}))) as server:
        responses = tmp_path / "responses.json"
        responses.write_text(json.dumps(entries[:6]))
        result = run_cli("evaluate", "--responses", str(responses), "--judge-url", server.url, "--judge-model", "x",
                         "--judge-api", "openai", "--out", str(tmp_path / "out"))
        asked = len(server.requests)
    errors = [line for line in result.stderr.splitlines() if line.startswith("instructkit: error")]
    assert result.returncode == 2 and len(errors) == 1 and words in errors[0]
    assert asked == 1  # the first request, alone: no retry, no fan-out
    assert not (tmp_path / "out" / "report.md").exists()


def test_other_client_errors_are_counted_without_retry(entries, tmp_path):
    with scripted_openai_server(lambda n, body: ("status", 400) if n == 2 else ("reply", "50")) as server:
        config = JudgeConfig(url=server.url, model="m", api="openai", concurrency=1, retries=3)
        verdicts = judge_responses(entries[:3], config, tmp_path / "c.jsonl", progress=False)
        asked = len(server.requests)
    assert [v.status for v in verdicts] == ["scored", "failed", "scored"] and asked == 3


def test_unset_api_key_variable_is_one_line(entries, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:2]))
    result = run_cli("evaluate", "--responses", str(responses), "--judge-url", "http://127.0.0.1:9", "--judge-model", "m",
                     "--judge-api-key-env", "NO_SUCH_KEY_VAR")
    assert result.returncode == 2 and "NO_SUCH_KEY_VAR: that environment variable is not set" in result.stderr


def test_unreachable_server_says_where_and_how(entries, tmp_path):
    config = JudgeConfig(url="http://127.0.0.1:9", model="llama3", api="ollama")
    with pytest.raises(UserError, match=r"unreachable at http://127.0.0.1:9 .*ollama serve.*ollama pull llama3"):
        judge_responses(entries[:1], config, tmp_path / "c.jsonl", progress=False)


def test_agreement_matches_scipy_on_the_chapter_score_files(shared_data):
    gpt4 = load_scores(shared_data / "gpt4-model-1-response.json")
    llama = load_scores(shared_data / "llama3-8b-model-1-response.json")
    stats = agreement(gpt4, llama, ("gpt4", "llama3"))
    assert stats["mean_a"] == pytest.approx(74.09)
    assert stats["pearson"] == pytest.approx(scipy.stats.pearsonr(gpt4, llama).statistic, abs=1e-9)
    assert stats["spearman"] == pytest.approx(scipy.stats.spearmanr(gpt4, llama).statistic, abs=1e-9)
    assert stats["kendall_tau_b"] == pytest.approx(scipy.stats.kendalltau(gpt4, llama).statistic, abs=1e-9)


def test_agreement_of_unequal_files_is_one_line(shared_data):
    result = run_cli("evaluate", "--agreement", str(shared_data / "gpt4-model-2-response.json"),
                     str(shared_data / "llama3-8b-model-2-response.json"))
    assert result.returncode == 2 and "has 100 scores" in result.stderr and "has 99" in result.stderr


def test_pairwise_compare_asks_both_orders_and_counts_consistent_wins(entries, tmp_path):
    """Ollama stand-in (see ollama_stand_in): it prefers whichever response contains 'GOOD'."""
    good = [{**e, "model_response": "GOOD " + e["output"]} for e in entries[:4]]
    bad = [{**e, "model_response": "bad"} for e in entries[:4]]
    first, second = tmp_path / "good.json", tmp_path / "bad.json"
    first.write_text(json.dumps(good))
    second.write_text(json.dumps(bad))

    def prefer_good(body):
        prompt = body["messages"][0]["content"]
        if "Response A: `GOOD" in prompt:
            return ["A"]
        if "Response B: `GOOD" in prompt:
            return ["B"]
        return ["85"]

    with ollama_stand_in(prefer_good) as server:
        result = run_cli("evaluate", "--responses", str(first), "--compare", str(second), "--judge-url", server.url,
                         "--judge-model", "llama3", "--judge-api", "ollama", "--out", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        pair_requests = [r for r in server.requests if "which response is better" in r["messages"][0]["content"]]
    assert len(pair_requests) == 8  # both orders for each of the 4 entries
    pairwise = json.loads((tmp_path / "out" / "evaluation.json").read_text())["pairwise"]
    assert (pairwise["wins"], pairwise["ties"], pairwise["losses"], pairwise["undecided"]) == (4, 0, 0, 0)
    assert pairwise["net_preference"] == 1.0


def _strict_json(path):
    """evaluation.json as a strict parser reads it: NaN is not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_judge_that_scores_nothing_fails_the_evaluation(entries, tmp_path):
    """Stand-in: every request fails (HTTP 500). The evaluation must say the judge failed and exit
    non-zero; before, it exited 0 with "Judge mean nan, 0 scored, 6 failed"."""
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:6]))
    with scripted_openai_server(lambda n, body: ("status", (500, {"error": {"message": "model crashed"}}))) as server:
        result = run_cli("evaluate", "--responses", str(responses), "--judge-url", server.url, "--judge-model", "m",
                         "--judge-api", "openai", "--judge-retries", "0", "--out", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("instructkit:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "judge failed: 0 of 6 entries scored" in errors[0] and "HTTP 500: model crashed" in errors[0]
    assert "Traceback" not in result.stderr and not re.search(r"\bnan\b", result.stdout, re.IGNORECASE)
    judge = _strict_json(tmp_path / "out" / "evaluation.json")["judge"]
    assert judge["status"] == "failed" and judge["mean"] is None and len(judge["failed"]) == 6
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Judge failed: it scored 0 of 6 entries" in report and "HTTP 500: model crashed" in report
    assert not re.search(r"\bnan\b", report, re.IGNORECASE) and "Mean score" not in report


def test_judge_max_failures_decides_between_a_warning_and_a_failure(entries, tmp_path):
    """Stand-in: one of 12 entries always fails. 8% unscored is a warning under the default 10%;
    with --judge-max-failures 0 the same evaluation fails."""
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:12]))
    failing = entries[3]["instruction"]

    def script(n, body):
        return ("status", 503) if failing in body["messages"][0]["content"] else ("reply", "60")

    with scripted_openai_server(script) as server:
        args = ["evaluate", "--responses", str(responses), "--judge-url", server.url, "--judge-model", "m",
                "--judge-api", "openai", "--judge-retries", "0", "--out", str(tmp_path / "out")]
        warned = run_cli(*args)
        failed = run_cli(*args, "--judge-max-failures", "0")
    assert warned.returncode == 0, warned.stderr
    assert "instructkit: warning: judge left entries unscored: 11 of 12 entries scored" in warned.stderr
    assert "Judge mean 60.00" in warned.stdout
    assert failed.returncode == 1 and "instructkit: error: judge failed: 11 of 12 entries scored" in failed.stderr
    assert "entry 3: ServerBusy: HTTP 503" in failed.stderr


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_stream_that_never_ends_is_cut_at_the_deadline(entries, tmp_path, api):
    """Stand-ins that answer 200 and then send a chunk (Ollama) or a byte (OpenAI) every 50 ms
    forever: each read is quick, so only an overall deadline ends the call. The stand-in records
    that the client hung up; without a deadline the client waits until the stand-in gives up."""
    forever = entries[0]["instruction"]
    if api == "ollama":
        server = ollama_stand_in(lambda body: {"pieces": ["4"], "end": "forever"}
                                 if forever in body["messages"][0]["content"] else ["42"])
    else:
        server = scripted_openai_server(lambda n, body: ("trickle", None) if forever in body["messages"][0]["content"]
                                        else ("reply", "42"))
    with server:
        config = JudgeConfig(url=server.url, model="llama3", api=api, concurrency=1, timeout=1.0, retries=0)
        verdicts = judge_responses(entries[:2], config, tmp_path / "c.jsonl", progress=False)
        assert server.wait_for_stream_end()  # the stand-in notices the hang-up at its next write
        hung_up = list(server.hung_up)
    assert [v.status for v in verdicts] == ["failed", "scored"]
    assert "DeadlineExceeded" in verdicts[0].error and hung_up == [1]
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 1  # the cut answer is not cached


def test_busy_server_is_asked_again_after_its_retry_after(entries, tmp_path):
    """Stand-in: 429, then 503, each with Retry-After: 1, then a score. Both are retried, each after
    at least the second the server asked for (the backoff alone waits 0.25 s, then 0.5 s)."""

    def script(n, body):
        if n <= 2:
            return ("status", (429 if n == 1 else 503, {"error": "busy"}, {"Retry-After": "1"}))
        return ("reply", "70")

    with scripted_openai_server(script) as server:
        config = JudgeConfig(url=server.url, model="m", api="openai", concurrency=1, retries=3)
        verdicts = judge_responses(entries[:1], config, tmp_path / "c.jsonl", progress=False)
        times = list(server.times)
    assert verdicts[0].score == 70 and len(times) == 3
    assert times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0


def test_retry_delay_honours_retry_after_within_a_bound():
    from email.utils import formatdate

    from instructkit.evaluate.judge_http import MAX_RETRY_AFTER, retry_delay

    assert retry_delay(0, None) == 0.25 and retry_delay(2, None) == 1.0 and retry_delay(10, None) == 8.0
    assert retry_delay(0, "2") == 2.0 and retry_delay(0, "0") == 0.0
    assert retry_delay(0, "86400") == MAX_RETRY_AFTER == 30.0  # a server cannot park the evaluation
    assert 5 < retry_delay(0, formatdate(time.time() + 10, usegmt=True)) <= 10  # the HTTP-date form
    assert retry_delay(1, "soon") == 0.5 and retry_delay(1, "nan") == 0.5  # unreadable: the backoff


def test_content_that_is_not_a_string_is_a_counted_failure_never_cached(entries, tmp_path):
    """Stand-ins whose replies carry a number, a list or null where the content string belongs:
    each is one failed verdict (asked once: at temperature 0 it comes back the same), not a
    traceback, and nothing of it reaches the cache."""
    contents = {entries[0]["instruction"]: 85, entries[1]["instruction"]: ["85"], entries[2]["instruction"]: None,
                entries[3]["instruction"]: "85"}

    def script(n, body):
        return ("reply", next(v for k, v in contents.items() if k in body["messages"][0]["content"]))

    cache = tmp_path / "c.jsonl"
    with scripted_openai_server(script) as server:
        config = JudgeConfig(url=server.url, model="m", api="openai", concurrency=1, retries=2)
        verdicts = judge_responses(entries[:4], config, cache, progress=False)
        asked = len(server.requests)
    assert [v.status for v in verdicts] == ["failed", "failed", "failed", "scored"] and asked == 4
    assert "content is 85, not a string" in verdicts[0].error and "is null" in verdicts[2].error
    with ollama_stand_in(lambda body: [8, 5]) as server:  # Ollama pieces that are numbers
        config = JudgeConfig(url=server.url, model="llama3", api="ollama", concurrency=1)
        ollama = judge_responses(entries[4:5], config, cache, progress=False)
    assert ollama[0].status == "failed" and "not a string" in ollama[0].error
    assert [json.loads(line)["reply"] for line in cache.read_text().splitlines()] == ["85"]
