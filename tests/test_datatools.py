"""Dataset tools: near-duplicates (the chapter's examples pinned), three pair finders that agree,
leakage found and prevented, and Magpie-style synthesis against a stand-in and a real server."""

import http.server
import json
import random
import threading
import time

import pytest

from instructkit.data.similarity import chunked_pairs, dense_pairs, minhash_pairs, tfidf
from instructkit.data.split import grouped_split, split_records
from instructkit.datatools.dedup import find_duplicates
from instructkit.datatools.leakage import find_leaks

from .conftest import run_cli

# The chapter's example records (ch07/02_dataset-utilities, find-near-duplicates.py).
CHAPTER_EXAMPLES = [
    {"instruction": "What is the capital of Italy?", "input": "", "output": "The capital of Italy is Rome."},
    {"instruction": "What's the capital city of Italy?", "input": "", "output": "The capital city is Rome."},
    {"instruction": "Identify the main verb in the sentence: 'The cat sleeps on the couch.'", "input": "",
     "output": "The verb is 'sleeps'."},
    {"instruction": "Identify the verb in the following sentence: The cat sleeps on the couch.", "input": "",
     "output": "The verb in the sentence is \"sleeps.\""},
]


def test_the_chapters_examples_pinned_and_why_our_default_is_0_8():
    matrix = tfidf([r["instruction"] for r in CHAPTER_EXAMPLES])
    similarity = (matrix @ matrix.T).toarray()
    assert similarity[0, 1] == pytest.approx(0.855, abs=0.01)  # the two "capital of Italy" questions
    assert similarity[2, 3] == pytest.approx(0.928, abs=0.01)  # the two "identify the verb" ones
    assert max(similarity[i, j] for i in (0, 1) for j in (2, 3)) <= 0.43
    found = lambda t: {(p.first, p.second) for p in find_duplicates(CHAPTER_EXAMPLES, fields=("instruction",),  # noqa: E731
                                                                         threshold=t, progress=False).pairs}
    assert found(0.8) == {(0, 1), (2, 3)}
    assert found(0.9) == {(2, 3)}  # the chapter's CLI default misses the capital-of-Italy pair


def _corpus(n: int, planted: int, seed: int = 0):
    rng = random.Random(seed)
    words = ("apple river stone cloud tiger lemon piano garden window rocket candle forest bottle dragon island jacket "
             "kettle ladder magnet needle orange pepper rabbit saddle tomato violin walnut yogurt zebra anchor").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))) + f" item {i}" for i in range(n)]
    twins = []
    for k in range(planted):
        source = rng.randrange(n)
        words_of = texts[source].split()
        words_of[rng.randrange(len(words_of))] = rng.choice(words)  # one word changed
        texts.append(" ".join(words_of))
        twins.append((source, len(texts) - 1))
    return texts, twins


def test_dense_chunked_and_minhash_find_the_same_pairs():
    texts, twins = _corpus(2000, 60)
    matrix = tfidf(texts)
    dense = {(i, j) for i, j, _ in dense_pairs(matrix, 0.8)}
    chunked = {(i, j) for i, j, _ in chunked_pairs(matrix, 0.8, chunk=300)}
    lsh = {(i, j) for i, j, _ in minhash_pairs(texts, matrix, 0.8)}
    assert dense == chunked
    assert {tuple(sorted(t)) for t in twins} <= dense
    assert len(lsh & dense) / len(dense) >= 0.95 and lsh <= dense  # recall, and no false positive after verification


def test_dedup_command_keeps_first_records_and_writes_the_pairs(tmp_path):
    records = CHAPTER_EXAMPLES + [dict(CHAPTER_EXAMPLES[0]), {**CHAPTER_EXAMPLES[1], "output": "Rome is Italy's capital."}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    result = run_cli("dedup", "--data", str(data), "--out", str(tmp_path / "kept.json"))
    assert result.returncode == 0, result.stderr
    kept = json.loads((tmp_path / "kept.json").read_text())
    report = json.loads((tmp_path / "kept-duplicates.json").read_text())
    assert records[4] not in kept[1:] and len(kept) < len(records)  # the exact copy of record 0 is dropped
    assert 4 in report["dropped"] and 0 not in report["dropped"]
    assert any(c == [0, 1, 4] or set(c) >= {0, 4} for c in report["clusters"])


def test_planted_leaks_are_found_and_a_clean_split_has_none(chapter_data_path):
    records = json.loads(chapter_data_path.read_text())
    splits = split_records(records)
    train, test = list(splits.train), list(splits.test)
    clean = find_leaks(train, test)
    planted = [dict(train[3]),  # exact
               {**train[10], "instruction": train[10]["instruction"].rstrip(".?!") + " please."},  # paraphrase
               {"instruction": "Summarize the text.", "input": "", "output": "Intro words. " + " ".join(
                   train[20]["output"].split()[:13]) + " more."}]
    leaky = find_leaks(train, test + planted)
    base = len(test)
    assert (base, 3) in leaky.exact_record and any(t == base + 1 and i == 10 for t, i, _ in leaky.near)
    if len(train[20]["output"].split()) >= 13:
        assert any(t == base + 2 for t, _, _ in leaky.ngram)
    assert leaky.leaked_test_records - clean.leaked_test_records >= {base, base + 1}


def test_the_grouped_split_leaves_no_near_duplicate_across_splits(chapter_data_path):
    records = json.loads(chapter_data_path.read_text())
    doubled = records + [{**r, "instruction": r["instruction"] + " "} for r in records[::50]]  # near twins, late in the file
    prompts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in doubled]
    pairs = [(i, j) for i, j, _ in chunked_pairs(tfidf(prompts), 0.8)]  # what the split groups by
    side = lambda splits: {id(r): name for name in ("train", "test", "val") for r in splits.by_name(name)}  # noqa: E731
    grouped, plain = side(grouped_split(doubled)), side(split_records(doubled))
    assert abs(sum(v == "train" for v in grouped.values()) - 0.85 * len(doubled)) < 10
    assert all(grouped[id(doubled[i])] == grouped[id(doubled[j])] for i, j in pairs)
    assert any(plain[id(doubled[i])] != plain[id(doubled[j])] for i, j in pairs)  # the chapter's split does leak them
    assert find_leaks(grouped_split(doubled).train, grouped_split(doubled).test).exact_record == []


def test_dedup_and_leakage_compare_conversations_on_their_user_turns_and_answers(tmp_path):
    """Conversations (ShareGPT here, messages below) are compared as their joined user turns and
    joined answers: a copy read in another format and a reworded twin are found, a conversation
    that only shares its first turn is not."""
    def chat(*turns):
        return [{"role": role, "content": text} for pair in turns for role, text in zip(("user", "assistant"), pair)]

    first = chat(("Sort these: pear, fig, kiwi.", "fig, kiwi, pear"), ("Now only the first two.", "fig, kiwi"))
    other = chat(("Sort these: pear, fig, kiwi.", "fig, kiwi, pear"),
                 ("Which of them grows on a vine?", "The kiwi does: kiwifruit grow on woody vines, in pergolas."))
    unrelated = chat(("Name a primary colour.", "Red."),)
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                   for m in messages]} for messages in (first, other, unrelated, first)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in sharegpt))
    result = run_cli("dedup", "--data", str(data), "--out", str(tmp_path / "kept.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "kept-duplicates.json").read_text())
    assert report["dropped"] == [3]  # the copy of conversation 0; 0 and 1 share a turn, not their text
    assert "Sort these: pear, fig, kiwi.\\nNow only the first two." in result.stdout
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert [len(r["messages"]) for r in kept] == [4, 4, 2]  # written back in the messages shape

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"messages": m}) for m in (first, unrelated)))
    reworded = chat(("Sort these ones: pear, fig, kiwi.", "fig, kiwi, pear"), ("Now only the first two.", "fig, kiwi"))
    test.write_text("\n".join(json.dumps({"messages": m}) for m in (other, reworded)))
    result = run_cli("leakage", "--train", str(train), "--test", str(test))
    assert result.returncode == 0, result.stderr
    assert "exact record 0" in result.stdout and "near prompt 1" in result.stdout
    assert "test [1] ~ train [0]" in result.stdout and "test [0] ~" not in result.stdout


# Synthesis ----------------------------------------------------------------------------------
class ScriptedRawServer:
    """A stand-in raw-completion server (the failures below cannot be made to happen on demand in a
    real one): OpenAI-style /v1/completions or Ollama-style /api/generate, scripted per request."""

    def __init__(self, script, api="openai"):
        self.script, self.api, self.requests = script, api, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                action, value = outer.script(len(outer.requests), body)
                if action == "status":
                    self.send_response(value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "hang":
                    time.sleep(value)
                    return
                text, stopped = value
                if outer.api == "ollama":
                    data = {"model": body["model"], "response": text, "done": True, "done_reason": "stop" if stopped else "length"}
                else:
                    data = {"choices": [{"index": 0, "text": text, "finish_reason": "stop" if stopped else "length"}]}
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


QUERIES = ["Name three primary colors.", "Explain photosynthesis in one sentence.", "Name three primary colors.",
           "I'm sorry, I cannot help with that.", "Give a synonym for happy.", "Name three primary colours?",
           "Translate 'good morning' into French.", "List two planets."]


def _script():
    """Query k: QUERIES[seed offset]; item 1's response lacks a stop (truncated); item 4's first
    query answer is HTTP 500 once (retried); item 6's query times out once (retried)."""
    served = {"500": False, "hang": False}

    def script(n, body):
        prompt = body["prompt"]
        seed = body.get("seed", body.get("options", {}).get("seed")) - 100
        if prompt.endswith("user\n"):  # the query stage (the gemma preset's pre-query)
            if seed == 4 and not served["500"]:
                served["500"] = True
                return ("status", 500)
            if seed == 6 and not served["hang"]:
                served["hang"] = True
                return ("hang", 2)
            return ("text", (QUERIES[seed % len(QUERIES)], True))
        return ("text", (f"Here is answer number {seed}.", seed != 1))
    return script


def _synth(url, out, *extra, api="openai"):
    return run_cli("synth", "--url", url, "--api", api, "--model", "stand-in", "--preset", "gemma", "--n", "4",
                   "--out", str(out), "--seed", "100", "--concurrency", "2", "--timeout", "1", "--retries", "2", *extra)


def test_synth_filters_dedups_retries_and_records_provenance(tmp_path):
    server = ScriptedRawServer(_script())
    try:
        result = _synth(server.url, tmp_path / "s.jsonl")
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [r["instruction"] for r in rows] == ["Name three primary colors.", "Give a synonym for happy.",
                                                    "Translate 'good morning' into French.", "List two planets."]
        assert rows[0]["provenance"] == {"backend": "openai", "model": "stand-in", "preset": "gemma", "seed": 100,
                                         "query_options": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 96},
                                         "response_options": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}}
        out = result.stdout
        for reason in ("duplicate query", "refusal", "near-duplicate query", "response did not end by itself"):
            assert f"dropped ({reason}): 1" in out, reason
        query = next(r for r in server.requests if r["prompt"] == "<start_of_turn>user\n")
        assert query["temperature"] == 1.0 and query["stop"] == ["<end_of_turn>", "<start_of_turn>"]
        asked = len(server.requests)
        again = _synth(server.url, tmp_path / "s.jsonl")  # resumed: already complete, nothing asked twice
        assert again.returncode == 0 and len(server.requests) == asked
        assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4
    finally:
        server.close()


def test_synth_ollama_requests_are_raw_with_options(tmp_path):
    server = ScriptedRawServer(_script(), api="ollama")
    try:
        assert _synth(server.url, tmp_path / "o.jsonl", api="ollama").returncode == 0
        body = server.requests[0]
        assert body["path"] == "/api/generate" and body["raw"] is True and body["stream"] is False
        assert set(body["options"]) == {"temperature", "top_p", "seed", "num_predict", "stop"} and "seed" not in body
        dry = run_cli("synth", "--url", server.url, "--api", "ollama", "--out", str(tmp_path / "x.jsonl"), "--dry-run")
        assert dry.returncode == 0 and '"raw": true' in dry.stdout and not (tmp_path / "x.jsonl").exists()
    finally:
        server.close()


def test_synth_end_to_end_against_our_own_server(tmp_path):
    from .serve_helpers import running_server

    with running_server("--model", "tiny-gemma3", "--prompt-style", "gemma") as (url, _, _):
        result = run_cli("synth", "--url", url, "--model", "tiny-gemma3", "--preset", "gemma", "--n", "2",
                         "--out", str(tmp_path / "t.jsonl"), "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert "Accepted" in result.stdout and (tmp_path / "t.jsonl.log.jsonl").exists()
    log = [json.loads(line) for line in (tmp_path / "t.jsonl.log.jsonl").read_text().splitlines()]
    assert log and all(row["status"] in ("accepted", "dropped") for row in log)  # random weights: mostly dropped, all accounted for
