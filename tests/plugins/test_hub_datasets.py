"""The hub caption datasets (``flickr30k``, ``coco``) on tiny copies in their real layouts
(``hub_layouts``): shard-by-shard reading of shards that disagree, Karpathy's split for COCO's
alt text by image id (no leak in any mix), pinned revisions, hints that work as written, and
URL images downloaded once with failures left out and reported."""

from __future__ import annotations

import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import hub_layouts
import pytest

from vlmkit.core.contracts import SPLITS
from vlmkit.core.errors import ConfigError, DataError
from vlmkit.plugins.datasets import _hub
from vlmkit.plugins.datasets.coco import CocoDataset
from vlmkit.plugins.datasets.flickr30k import Flickr30kDataset
from vlmkit.sdk.datasets import DataWarning, load_split


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "vlmkit-home"))  # the Arrow copies of parquet files
    _hub._load_raw.cache_clear()
    yield
    _hub._load_raw.cache_clear()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return SimpleNamespace(
        flickr=hub_layouts.flickr30k(root / "flickr30k"),
        flickr_alt=hub_layouts.flickr30k(root / "flickr30k-gpt4o", "alt-text"),
        karpathy=hub_layouts.coco_karpathy(root / "coco-karpathy", root / "coco-images"),
        images=root / "coco-images",
        gpt4o=hub_layouts.coco_gpt4o(root / "coco-gpt4o"),
    )


def load_all(spec, options, seed=0):
    return {split: spec.load(split, options, seed=seed) for split in SPLITS}


def ids_of(splits):
    return {name: {ex.id for ex in ds} for name, ds in splits.items()}


# --------------------------------------------------------------------------------------- flickr30k


def test_flickr30k_reads_the_parquet_export_shard_by_shard_on_the_karpathy_split(layouts):
    splits = load_all(Flickr30kDataset(), {"path": str(layouts.flickr)})
    assert [len(splits[s]) for s in SPLITS] == [18, 6, 6]  # rows of both shards, Karpathy's split column
    ex = splits["test"][0]
    assert ex.id == "14" and ex.captions == [f"photo 14 caption {k}" for k in range(5)]
    assert ex.load_image().getpixel((0, 0)) == (14 * 8, 0, 0)
    assert splits["test"].info["upstream_splits"] is True
    hashed = load_all(Flickr30kDataset(), {"path": str(layouts.flickr), "splits": "hash"}, seed=3)
    assert ids_of(hashed) != ids_of(splits)
    assert not ids_of(hashed)["train"] & ids_of(hashed)["test"]


def test_flickr30k_alt_text_splits_the_same_images_the_same_way(layouts):
    original = load_all(Flickr30kDataset(), {"path": str(layouts.flickr)})
    alt = load_all(Flickr30kDataset(), {"captions": "alt-text", "path": str(layouts.flickr_alt)})
    assert ids_of(original) == ids_of(alt)
    first = alt["train"][0]
    assert first.captions == [f"alt text of photo {first.id}"]
    assert alt["train"].fingerprint != original["train"].fingerprint


def test_flickr30k_contract_suite_on_the_real_layout(layouts):
    from vlmkit.testing.contract import check_dataset

    check_dataset(Flickr30kDataset(), {"path": str(layouts.flickr)})
    check_dataset(Flickr30kDataset(), {"path": str(layouts.flickr), "splits": "hash"}, seed=2)


# --------------------------------------------------------------------------------------- coco


def test_coco_karpathy_files_give_the_split_and_images_come_from_image_root(layouts):
    opts = {"path": str(layouts.karpathy), "image_root": str(layouts.images)}
    splits = load_all(CocoDataset(), opts)
    assert ids_of(splits) == {
        "train": {str(i) for i in range(10)},  # restval joins train
        "validation": {"10", "11", "12"},
        "test": {"13", "14", "15"},
    }  # and coco.parquet, which names no split (id 999), is not read
    ex = splits["validation"][0]
    assert ex.captions == ["coco 10 a", "coco 10 b"] and ex.load_image().size == (20, 16)
    with pytest.raises(ConfigError, match="splits=hash is refused: coco keeps Karpathy's split"):
        CocoDataset().load("train", {**opts, "splits": "hash"})


def test_coco_alt_text_takes_karpathy_split_by_image_id_so_no_mix_leaks(layouts):
    import datasets

    with pytest.raises(Exception, match="alt_text"):  # the fixture breaks datasets as the real one does
        datasets.load_from_disk(str(layouts.gpt4o))
    alt_opts = {"captions": "alt-text", "path": str(layouts.gpt4o), "karpathy_path": str(layouts.karpathy)}
    alt = ids_of(load_all(CocoDataset(), alt_opts))
    # COCO 2017 train holds Karpathy test images 13 and 14: they are test here, never train
    assert alt["test"] == {"13", "14", "15"} and alt["validation"] == {"10", "11", "12"}
    assert alt["train"] == {*(str(i) for i in range(10)), "100", "101", "102"}  # test2017: outside Karpathy

    entries = [
        SimpleNamespace(
            name="coco", options={"path": str(layouts.karpathy), "image_root": str(layouts.images)}
        ),
        SimpleNamespace(name="coco", options=alt_opts),
    ]
    for seed in (0, 7):
        mixed = {s: {ex.id.split("/", 1)[1] for ex in load_split(entries, s, seed=seed)} for s in SPLITS}
        assert not mixed["train"] & (mixed["test"] | mixed["validation"])
        assert mixed["test"] == {"13", "14", "15"}

    with pytest.raises(
        DataError, match=r"none of its 19 image ids \(coco_url: .*pass id_column= the COCO image id"
    ):
        CocoDataset().load("train", {**alt_opts, "id_column": "coco_url"})  # ids that cannot be matched

    # rows whose alt_text is a string and rows whose alt_text is a list both give their caption
    examples = {ex.id: ex for s in SPLITS for ex in CocoDataset().load(s, alt_opts)}
    assert examples["0"].captions == ["alt 0"] and examples["1"].captions == ["alt 1"]
    assert examples["13"].load_image().getpixel((0, 0)) == (13, 50, 0)


def test_a_bad_shard_or_a_shard_without_a_column_is_one_line_naming_it(layouts, tmp_path):
    import shutil

    copy = shutil.copytree(layouts.gpt4o, tmp_path / "gpt4o")
    shard = copy / "train" / "data-00001-of-00003.arrow"
    shard.write_bytes(shard.read_bytes()[:300])
    opts = {"captions": "alt-text", "path": str(copy), "karpathy_path": str(layouts.karpathy)}
    with pytest.raises(DataError) as info:
        CocoDataset().load("train", opts)
    assert "\n" not in str(info.value) and f"cannot read shard {shard}" in str(info.value)

    _hub._load_raw.cache_clear()
    with pytest.raises(DataError, match="shard train/data-00002-of-00003.arrow has no column 'objects'"):
        CocoDataset().load("train", {**opts, "path": str(layouts.gpt4o), "captions_column": "objects"})


# --------------------------------------------------------------------------------------- revisions


def test_revisions_are_pinned_and_the_offline_hint_works_as_written(layouts, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        Flickr30kDataset().load("train")
    msg = str(info.value)
    assert "\n" not in msg
    assert (
        "huggingface_hub.snapshot_download('nlphuji/flickr30k', repo_type='dataset', "
        "revision='refs/convert/parquet', local_dir=DIR)) and pass path=DIR" in msg
    )
    assert "load_dataset" not in msg  # a script repository, and CastError on Mozilla/coco-gpt4o
    with pytest.raises(DataError, match="revision='70f916d6fe4b20ef8a20d3b44bc39290387e3a73'"):
        CocoDataset().load("test", {"captions": "alt-text"})
    with pytest.raises(
        DataError, match=r"'yerevann/coco-karpathy'.*local_dir=DIR\)\) and pass karpathy_path=DIR$"
    ):
        CocoDataset().load(
            "test", {"captions": "alt-text", "path": str(layouts.gpt4o)}
        )  # Karpathy's split next
    with pytest.raises(DataError, match="cannot download revision my-branch .*revision='my-branch'"):
        CocoDataset().load("test", {"revision": "my-branch"})
    for source in (*CocoDataset.sources.values(), Flickr30kDataset.sources["alt-text"]):
        assert len(source.revision) == 40 and int(source.revision, 16) >= 0  # commit shas


def test_the_revision_is_recorded_with_the_data(layouts, monkeypatch):
    opts = {"captions": "alt-text", "path": str(layouts.gpt4o), "karpathy_path": str(layouts.karpathy)}
    data = CocoDataset().load("test", opts)
    assert data.info["source"] == str(layouts.gpt4o) and data.info["revision"] is None  # a local copy
    assert data.info["splits_from"] == f"{layouts.karpathy} by image id"
    # from the hub: the pinned revisions (the snapshot stands in for the download here)
    snapshots = {"Mozilla/coco-gpt4o": layouts.gpt4o, "yerevann/coco-karpathy": layouts.karpathy}
    asked = []

    def snapshot(dataset_id, revision, where, hint):
        asked.append((dataset_id, revision))
        return snapshots[dataset_id]

    monkeypatch.setattr(_hub, "_snapshot", snapshot)
    hub = CocoDataset().load("test", {"captions": "alt-text"})
    assert hub.info["revision"] == "70f916d6fe4b20ef8a20d3b44bc39290387e3a73"
    assert (
        hub.info["splits_from"]
        == "yerevann/coco-karpathy@b6cdca8a4fe0f67b7bdcb03d6ed2def420f5a9dd by image id"
    )
    assert asked == [
        ("Mozilla/coco-gpt4o", "70f916d6fe4b20ef8a20d3b44bc39290387e3a73"),
        ("yerevann/coco-karpathy", "b6cdca8a4fe0f67b7bdcb03d6ed2def420f5a9dd"),
    ]
    _hub._load_raw.cache_clear()
    CocoDataset().load("test", {"captions": "alt-text", "revision": "v2"})  # the override
    assert asked[-2] == ("Mozilla/coco-gpt4o", "v2")


# --------------------------------------------------------------------------------------- downloads


@pytest.fixture
def coco_site(tmp_path):
    """Serves the tiny COCO's images except the test image 14 (404)."""
    from PIL import Image

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            if "000000000014" in self.path:
                return self.send_error(404)
            import io

            buf = io.BytesIO()
            Image.new("RGB", (9, 7), (1, 2, 3)).save(buf, "JPEG")
            self.send_response(200)
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_coco_without_image_root_downloads_once_and_leaves_out_what_fails(coco_site, tmp_path):
    copy = hub_layouts.coco_karpathy(tmp_path / "karpathy", url_base=coco_site)
    opts = {"path": str(copy), "download_dir": str(tmp_path / "dl")}
    with pytest.warns(DataWarning) as caught:
        test = CocoDataset().load("test", opts)
    (warning,) = [str(w.message) for w in caught]
    assert "1 of 3 images could not be downloaded" in warning and "HTTP 404" in warning
    assert str(tmp_path / "dl" / "failed-downloads.tsv") in warning and "\n" not in warning
    assert [ex.id for ex in test] == ["13", "15"] and test[0].load_image().size == (9, 7)
    assert list(test.info["problems"]) == ["14"]  # the training job lists these in the run folder
    _hub._load_raw.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        validation = CocoDataset().load("validation", opts)  # nothing fails: no warning
    assert len(validation) == 3
