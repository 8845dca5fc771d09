"""Hub-style datasets that point outside: a path column naming ``/etc/passwd`` or ``../secret``,
URLs of other schemes than http(s) (``file://``, ``ftp://``). Those rows are left out, listed
(the run folder's bad_images.tsv) and named in one warning; nothing outside is read."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hub_layouts
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmkit.plugins.datasets import _hub
from vlmkit.plugins.datasets.coco import CocoDataset
from vlmkit.sdk.datasets import DataWarning


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "vlmkit-home"))
    _hub._load_raw.cache_clear()
    yield tmp_path / "hf-cache"
    _hub._load_raw.cache_clear()


def rewrite_test_split(root, column: str, values: dict[int, str]) -> None:
    """Set ``column`` of the test split's rows by cocoid."""
    file = root / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(file)
    ids = table.column("cocoid").to_pylist()
    cells = [values.get(i, v) for i, v in zip(ids, table.column(column).to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(cells, pa.string()))
    pq.write_table(table, file)


def test_a_path_column_naming_files_outside_the_image_root_is_not_read(tmp_path):
    images = tmp_path / "images"
    root = hub_layouts.coco_karpathy(tmp_path / "karpathy", images)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(
        (images / "val2014" / "COCO_val2014_000000000013.jpg").read_bytes()
    )
    rewrite_test_split(root, "filename", {14: "../../outside/secret.png", 15: "/etc/passwd"})
    with pytest.warns(DataWarning) as caught:
        test = CocoDataset().load("test", {"path": str(root), "image_root": str(images)})
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert f"2 of 3 images are outside {images} (first: {images}/val2014/../../outside/secret.png" in warning
    assert warning.endswith("they are left out")
    assert [ex.id for ex in test] == ["13"] and sorted(test.info["problems"]) == ["14", "15"]


@pytest.fixture
def site():
    from PIL import Image

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            import io

            buf = io.BytesIO()
            Image.new("RGB", (9, 7), (1, 2, 3)).save(buf, "JPEG")
            self.send_response(200)
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_urls_of_other_schemes_than_http_are_not_fetched(site, tmp_path):
    root = hub_layouts.coco_karpathy(tmp_path / "karpathy", url_base=site)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for training")
    rewrite_test_split(root, "url", {14: f"file://{secret}", 15: "ftp://127.0.0.1/x.jpg"})
    with pytest.warns(DataWarning) as caught:
        test = CocoDataset().load("test", {"path": str(root), "download_dir": str(tmp_path / "dl")})
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert (
        "2 of 3 images could not be downloaded" in warning and "is not an http(s) URL (not read)" in warning
    )
    assert [ex.id for ex in test] == ["13"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir() if p.suffix == ".jpg") == [
        next(p.name for p in (tmp_path / "dl").iterdir() if p.name.endswith("000000000013.jpg"))
    ]


def test_a_local_copy_leaves_nothing_in_the_huggingface_cache(tmp_path, hf_cache):
    """``coco`` with ``path=``: the Arrow copies ``datasets`` makes of parquet files go under
    $VLMKIT_HOME (or train's --cache-dir), not into ~/.cache/huggingface/datasets."""
    from vlmkit.sdk.datasets import dataset_cache_root

    images = tmp_path / "images"
    root = hub_layouts.coco_karpathy(tmp_path / "karpathy", images)
    CocoDataset().load("test", {"path": str(root), "image_root": str(images)})
    assert not hf_cache.exists() or not any(hf_cache.rglob("*.arrow"))
    assert any((tmp_path / "vlmkit-home" / "hf-datasets").rglob("*.arrow"))
    _hub._load_raw.cache_clear()
    with dataset_cache_root(tmp_path / "run-cache"):
        CocoDataset().load("test", {"path": str(root), "image_root": str(images)})
    assert any((tmp_path / "run-cache" / "hf-datasets").rglob("*.arrow"))


def test_a_server_trickling_bytes_meets_the_per_download_deadline(tmp_path):
    """One byte every 0.2 s never trips the read timeout; the deadline of a whole try does."""
    import time

    from vlmkit.plugins.datasets._download import DownloadPolicy, download_images

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.jpg"
        started = time.monotonic()
        policy = DownloadPolicy(workers=1, retries=0, timeout=5.0, deadline=1.0)
        done, failed = download_images({"a": url}, tmp_path / "dl", policy, progress=False)
        assert time.monotonic() - started < 4
        assert done == {} and "took over 1 s (the server sends too slowly)" in failed["a"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_list_of_failed_downloads_keeps_the_failures_of_an_earlier_split(site, tmp_path):
    from vlmkit.plugins.datasets._download import FAILURES_FILE, DownloadPolicy, download_images

    policy = DownloadPolicy(workers=2, retries=0)
    folder = tmp_path / "dl"
    train = {"a": f"{site}/a.jpg", "b": "ftp://127.0.0.1/b.jpg"}
    assert list(download_images(train, folder, policy, progress=False)[1]) == ["b"]
    assert download_images({"c": f"{site}/c.jpg"}, folder, policy, progress=False)[1] == {}
    lines = (folder / FAILURES_FILE).read_text().splitlines()
    assert lines[0] == "url\tproblem" and [line.split("\t")[0] for line in lines[1:]] == [train["b"]]
    assert download_images(train, folder, policy, progress=False)[1] != {}  # still failing: still listed
    assert len((folder / FAILURES_FILE).read_text().splitlines()) == 2
