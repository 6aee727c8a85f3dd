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


def test_http_error_is_one_line(served):
    _, base, _ = served
    with pytest.raises(UserError, match=r"download failed with HTTP 404"):
        resolve_source(f"{base}/missing.json")


def test_unreachable_host_is_one_line_and_leaves_nothing(served, tmp_path):
    with pytest.raises(UserError, match="download failed .*local path"):
        resolve_source("http://127.0.0.1:9/data.json")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_named_sources_point_at_the_chapter_and_alpaca_files():
    assert NAMED_SOURCES["chapter7"].endswith("rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json")
    assert NAMED_SOURCES["alpaca52k"].endswith("tatsu-lab/stanford_alpaca/main/alpaca_data.json")
