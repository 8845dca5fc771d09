"""Image downloads against a local HTTP server (127.0.0.1): good files, 404s, a 503 that recovers,
a body cut short, a slow answer, an oversized body, a non-image; parallel, resumable, reported."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.plugins.datasets._download import FAILURES_FILE, DownloadPolicy, download_images, file_name


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


class Site:
    """What each path answers; counts the requests and the Range headers it saw."""

    def __init__(self) -> None:
        self.files = {f"/good{i}.png": png(i * 20) for i in range(6)}
        self.hits: dict[str, int] = {}
        self.ranges: list[str] = []
        self.flaky_left = 1  # /flaky.png answers 503 this many times, then the image
        self.cut_left = 1  # /cut.png sends half its body and closes, this many times
        self.lock = threading.Lock()


def make_handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def send_body(self, body: bytes, *, status: int = 200, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client gave up on the slow answer
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's name
            with site.lock:
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                if self.headers.get("Range"):
                    site.ranges.append(f"{self.path} {self.headers['Range']}")
            if self.path in site.files:
                body = site.files[self.path]
                start = self.headers.get("Range", "").removeprefix("bytes=").removesuffix("-")
                if start.isdigit():
                    return self.send_body(body[int(start) :], status=206)
                return self.send_body(body)
            if self.path == "/flaky.png":
                with site.lock:
                    fail, site.flaky_left = site.flaky_left > 0, site.flaky_left - 1
                return self.send_error(503) if fail else self.send_body(png(200))
            if self.path == "/cut.png":
                body = png(99)
                with site.lock:
                    cut, site.cut_left = site.cut_left > 0, site.cut_left - 1
                if cut:  # promise the whole body, send half, hang up
                    self.send_body(body[: len(body) // 2], length=len(body))
                    self.close_connection = True
                    return None
                return self.send_body(body)
            if self.path == "/slow.png":
                time.sleep(1)
                return self.send_body(png(1))
            if self.path == "/huge.png":  # no Content-Length: refused by counting
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x89PNG" + b"\0" * 300_000)
                return None
            if self.path == "/big-declared.png":
                return self.send_body(b"x" * 10, length=10**9)
            if self.path == "/page.png":
                return self.send_body(b"<html>not an image</html>")
            return self.send_error(404)

    return Handler


@pytest.fixture
def server():
    site = Site()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(site))
    httpd.daemon_threads, httpd.block_on_close = True, False  # the slow answers are not waited for
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    site.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield site
    httpd.shutdown()
    httpd.server_close()


POLICY = DownloadPolicy(workers=8, retries=2, timeout=0.5, backoff=0.01, max_bytes=100_000)


def test_downloads_skip_and_report_what_fails_and_keep_the_rest(server, tmp_path):
    urls = {f"g{i}": f"{server.base}/good{i}.png" for i in range(6)}
    bad = {
        "missing": "/nothing.png",
        "slow": "/slow.png",
        "huge": "/huge.png",
        "declared": "/big-declared.png",
        "page": "/page.png",
    }
    urls |= {k: server.base + v for k, v in bad.items()}
    urls |= {"flaky": f"{server.base}/flaky.png", "cut": f"{server.base}/cut.png"}
    folder = tmp_path / "images"
    started = time.perf_counter()
    done, failed = download_images(urls, folder, POLICY, progress=False)
    elapsed = time.perf_counter() - started

    assert set(done) == {*(f"g{i}" for i in range(6)), "flaky", "cut"}  # 503 and the cut body retried
    assert Image.open(done["g3"]).getpixel((0, 0)) == (60, 0, 0)
    assert Image.open(done["cut"]).getpixel((0, 0)) == (99, 0, 0)
    assert set(failed) == set(bad)
    assert "404" in failed["missing"]
    assert "timed out" in failed["slow"] and "3 tries" in failed["slow"]
    assert "byte limit" in failed["huge"] and "byte limit" in failed["declared"]
    assert "not an image" in failed["page"]
    assert server.hits["/nothing.png"] == 1  # a 404 is not retried
    assert not list(folder.glob("*.part"))  # nothing half-written is left under any name
    report = (folder / FAILURES_FILE).read_text().splitlines()
    assert report[0] == "url\tproblem" and len(report) == 1 + len(bad)
    assert any(line.startswith(f"{server.base}/page.png\t") for line in report)
    assert elapsed < 4  # in parallel: the three slow tries of /slow.png do not hold up the rest

    # a second run fetches nothing that is complete, and tries the failures again
    hits = dict(server.hits)
    done2, failed2 = download_images(urls, folder, POLICY, progress=False)
    assert done2 == done and set(failed2) == set(bad)
    assert all(server.hits[f"/good{i}.png"] == hits[f"/good{i}.png"] for i in range(6))


def test_a_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    url = f"{server.base}/good2.png"
    folder = tmp_path / "images"
    folder.mkdir()
    body = server.files["/good2.png"]
    (folder / (file_name(url) + ".part")).write_bytes(body[:20])  # what a killed run left
    done, failed = download_images({"a": url}, folder, POLICY, progress=False)
    assert not failed and done["a"].read_bytes() == body
    assert server.ranges == ["/good2.png bytes=20-"]
    assert not (folder / FAILURES_FILE).exists()


def test_file_names_are_unique_per_url_and_safe():
    a, b = file_name("http://x/a/1.jpg"), file_name("http://y/a/1.jpg")
    assert a != b and a.endswith("-1.jpg") and b.endswith("-1.jpg")
    assert "/" not in file_name("http://x/../../etc/passwd?q=1") and Path(file_name("http://x/")).name
