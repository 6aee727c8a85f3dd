"""Downloads through a real HTTP server on 127.0.0.1, cached with size and checksum."""

import http.server
import json
import threading
from functools import partial

import pytest

from instructkit.data.sources import NAMED_SOURCES, resolve_source
from instructkit.errors import UserError


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """Serve a folder over HTTP on loopback; count requests; use a private cache folder."""
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    yield root, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_url_is_downloaded_once_and_checked(served):
    root, base, hits = served
    (root / "data.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    first = resolve_source(f"{base}/data.json")
    second = resolve_source(f"{base}/data.json")
    assert first == second and hits == ["/data.json"]
    meta = json.loads(first.with_name("data.json.meta.json").read_text())
    assert meta["size"] == first.stat().st_size and len(meta["sha256"]) == 64

    first.write_text("damaged")  # a damaged copy is noticed and fetched again
    assert json.loads(resolve_source(f"{base}/data.json").read_text())[0]["output"] == "b"
    assert len(hits) == 2
    for damaged_meta in ('{"size": 1', "[]"):  # so is a damaged record of it (a traceback before)
        first.with_name("data.json.meta.json").write_text(damaged_meta)
        assert json.loads(resolve_source(f"{base}/data.json").read_text())[0]["output"] == "b"
    assert len(hits) == 4


def test_http_error_is_one_line(served):
    _, base, _ = served
    with pytest.raises(UserError, match=r"download failed with HTTP 404"):
        resolve_source(f"{base}/missing.json")


def test_unreachable_host_is_one_line_and_leaves_nothing(served, tmp_path):
    with pytest.raises(UserError, match="download failed .*local path"):
        resolve_source("http://127.0.0.1:9/data.json")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_named_sources_are_pinned_to_a_commit_and_a_content_hash(chapter_data_path):
    from instructkit.data.sources import _matches_pin

    chapter, alpaca = NAMED_SOURCES["chapter7"], NAMED_SOURCES["alpaca52k"]
    assert "/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07/" in chapter.url
    assert "/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json" in alpaca.url
    assert alpaca.git_blob_sha1 and len(alpaca.git_blob_sha1) == 40
    assert _matches_pin(chapter_data_path, chapter) is None  # the shared copy is the pinned content
    assert "expected" in _matches_pin(chapter_data_path.parent / "instruction-examples.json", chapter)


def _flaky_server(body: bytes, truncate_first: int):
    """Serves `body` with its full Content-Length, but closes the connection early on the first
    `truncate_first` requests (a dropped download)."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if len(hits) <= truncate_first else body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


@pytest.mark.parametrize("truncated, ok", [(2, True), (3, False)])
def test_truncated_download_is_detected_and_retried(tmp_path, monkeypatch, truncated, ok):
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    body = json.dumps([{"instruction": f"q{i}", "output": "a" * 50} for i in range(200)]).encode()
    server, hits = _flaky_server(body, truncated)
    url = f"http://127.0.0.1:{server.server_address[1]}/d.json"
    try:
        if ok:
            assert resolve_source(url).read_bytes() == body and len(hits) == 3
        else:
            with pytest.raises(UserError, match=r"download failed 3 times"):
                resolve_source(url)
            assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    finally:
        server.shutdown()


def test_pinned_source_with_other_content_is_refused(served, monkeypatch):
    from instructkit.data import sources

    root, base, hits = served
    (root / "chapter.json").write_text(json.dumps([{"instruction": "not the chapter", "output": "x"}]))
    monkeypatch.setitem(sources.NAMED_SOURCES, "chapter7", sources.NamedSource(f"{base}/chapter.json", sha256="0" * 64))
    with pytest.raises(UserError, match=r"download failed 3 times \(sha256 .*expected 0000"):
        resolve_source("chapter7")
