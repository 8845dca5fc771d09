"""The ``captions-csv`` dataset keeps vlmkit's dataset contract and reads CSV files as documented."""

from __future__ import annotations

import pytest
from conftest import write_csv, write_images
from vlmkit import SPLITS, ConfigError, DataError
from vlmkit.testing import check_dataset

from vlmkit_plugin_example.captions_csv import CaptionsCsvDataset

SPEC = CaptionsCsvDataset()


def ids(options, seed=0):
    return {split: [ex.id for ex in SPEC.load(split, options, seed=seed)] for split in SPLITS}


def test_captions_csv_passes_the_vlmkit_dataset_contract(csv_options):
    sizes = check_dataset(SPEC, csv_options)

    assert sum(sizes.values()) == 40


def test_splits_depend_on_the_seed_and_each_image_keeps_its_split_when_rows_are_added(csv_file, csv_options):
    before = ids(csv_options)
    assert ids(csv_options, seed=1) != before

    rows = write_images(csv_file.parent, 60)  # 20 more images
    write_csv(csv_file, [{"path": p, "caption": c} for p, c in rows])
    after = ids(csv_options)

    for split in SPLITS:
        assert set(before[split]) <= set(after[split])


def test_rows_naming_one_image_give_it_several_reference_captions(tmp_path):
    (path, caption), *_ = write_images(tmp_path, 1)
    csv = write_csv(
        tmp_path / "captions.csv",
        [{"path": path, "caption": caption}, {"path": path, "caption": "A small round shape."}],
    )

    (example,) = SPEC.load("train", {"path": str(csv), "split_fractions": [1, 0, 0]})

    assert example.id == path
    assert example.captions == [caption, "A small round shape."]


def test_url_images_are_downloaded_on_first_use_and_kept(tmp_path):
    (path, caption), *_ = write_images(tmp_path, 1)
    source = tmp_path / path
    url = source.as_uri()  # a file:// URL goes through the same download code, offline
    csv = write_csv(tmp_path / "captions.csv", [{"url": url, "caption": caption}])
    downloads = tmp_path / "downloads"
    options = {"path": str(csv), "download_dir": str(downloads), "split_fractions": [1, 0, 0]}

    (example,) = SPEC.load("train", options)
    assert example.id == url
    assert not downloads.exists()  # nothing is fetched until the image is used

    assert example.load_image().size == (32, 32)
    source.unlink()
    (again,) = SPEC.load("train", options)
    assert again.load_image().size == (32, 32)  # read from download_dir


def test_an_unreachable_url_fails_when_used_naming_the_url(tmp_path):
    url = "http://127.0.0.1:9/offline.png"  # the discard port: the connection is refused at once
    csv = write_csv(tmp_path / "captions.csv", [{"url": url, "caption": "A photo."}])
    options = {"path": str(csv), "download_dir": str(tmp_path / "dl"), "split_fractions": [1, 0, 0]}

    (example,) = SPEC.load("train", options)

    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:9/offline\.png .*Offline\?"):
        example.load_image()


def test_missing_files_are_all_reported_when_the_dataset_loads(tmp_path):
    csv = write_csv(
        tmp_path / "captions.csv",
        [{"path": "gone-1.png", "caption": "A."}, {"path": "gone-2.png", "caption": "B."}],
    )

    with pytest.raises(
        DataError, match=r"2 image file\(s\) not found .*gone-1\.png \(line 2\), gone-2\.png \(line 3\)"
    ):
        SPEC.load("train", {"path": str(csv)})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,caption\na.png,A.\n", r"needs a header with a 'caption' column and a 'path' or 'url' column"),
        ("path,caption\na.png,\n", r"line 2 has no caption"),
        ("path,url,caption\n,,A.\n", r"line 2 has neither a path nor a url"),
        ("path,caption\n", r"lists no images"),
    ],
)
def test_malformed_csv_files_are_refused_naming_the_line(tmp_path, content, message):
    csv = tmp_path / "captions.csv"
    csv.write_text(content)

    with pytest.raises(DataError, match=message):
        SPEC.load("train", {"path": str(csv)})


def test_a_misspelt_option_is_named_with_a_suggestion(csv_file):
    with pytest.raises(ConfigError, match=r"unknown option 'paht' \(did you mean 'path'\?\)"):
        SPEC.load("train", {"paht": str(csv_file)})


def test_a_download_over_the_size_limit_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    import vlmkit_plugin_example.captions_csv as module

    (path, caption), *_ = write_images(tmp_path, 1)
    url = (tmp_path / path).as_uri()
    csv = write_csv(tmp_path / "captions.csv", [{"url": url, "caption": caption}])
    downloads = tmp_path / "dl"
    monkeypatch.setattr(module, "MAX_DOWNLOAD_BYTES", 10)  # the 32x32 PNG is larger than this
    options = {"path": str(csv), "download_dir": str(downloads), "split_fractions": [1, 0, 0]}

    (example,) = SPEC.load("train", options)
    with pytest.raises(DataError, match=r"is over 10 bytes, too large for an image"):
        example.load_image()
    assert not any(downloads.iterdir())  # no partial file left behind
