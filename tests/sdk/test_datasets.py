"""Dataset plugins and the shared helpers: seeded disjoint splits, options, bad files, mixing."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.core.contracts import SPLITS
from vlmkit.core.errors import ConfigError, DataError
from vlmkit.core.registry import Registry
from vlmkit.plugins.datasets.folder import FolderDataset
from vlmkit.plugins.datasets.shapes import ShapesDataset, caption_for
from vlmkit.sdk.datasets import DataWarning, ListDataset, assign_split, data_sources, mix, stratified_splits


def load_all(spec, options=None, seed=0):
    return {split: spec.load(split, options, seed=seed) for split in SPLITS}


def ids_of(splits):
    return {name: [ex.id for ex in ds] for name, ds in splits.items()}


def assert_disjoint(splits):
    ids = ids_of(splits)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(ids[a]) & set(ids[b]), f"{a} and {b} share images"


# --------------------------------------------------------------------------------------- registry


def test_builtin_datasets_register_through_entry_points_without_heavy_imports():
    code = (
        "import sys; from vlmkit.core.registry import Registry; r = Registry(); r.load_entry_points("
        "{'VLMKIT_PLUGINS': 'shapes,folder,flickr30k,coco'}); print(r.names('dataset'), r.broken); "
        "print(sorted(m for m in ('torch', 'datasets', 'PIL', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "['coco', 'flickr30k', 'folder', 'shapes'] []" in out
    assert out.strip().endswith("[]"), out


def test_registry_finds_specs_by_exact_name():
    registry = Registry()
    registry.load_entry_points({"VLMKIT_PLUGINS": "shapes,folder"})
    assert isinstance(registry.dataset("shapes"), ShapesDataset)
    assert isinstance(registry.dataset("folder"), FolderDataset)


# --------------------------------------------------------------------------------------- shapes


def test_shapes_splits_are_disjoint_deterministic_and_cover_every_caption_class():
    spec = ShapesDataset()
    splits = load_all(spec)
    assert_disjoint(splits)
    assert sum(len(d) for d in splits.values()) == 3000
    assert abs(len(splits["train"]) - 2400) < 50
    assert ids_of(splits) == ids_of(load_all(spec))  # same seed, same split
    assert splits["train"].fingerprint == spec.load("train").fingerprint
    classes = {caption_for(c, s, p) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
               for p in ("left", "right")}  # fmt: skip
    assert len(classes) == 24
    for split in ("validation", "test"):
        assert {ex.captions[0] for ex in splits[split]} == classes


def test_shapes_seed_changes_the_split_but_not_the_images():
    spec = ShapesDataset()
    a, b = spec.load("test", seed=0), spec.load("test", seed=1)
    assert {ex.id for ex in a} != {ex.id for ex in b}
    assert a.fingerprint != b.fingerprint
    train0 = {ex.id: ex for ex in spec.load("train", seed=0)}
    common = next(ex for ex in b if ex.id in train0)  # an image in test under seed 1, train under 0
    assert common.load_image().tobytes() == train0[common.id].load_image().tobytes()
    assert common.captions == train0[common.id].captions


def test_shapes_images_vary_but_captions_follow_from_them():
    ds = ShapesDataset().load("train", {"size": 96, "image_size": 32})
    by_caption: dict[str, list] = {}
    for ex in ds:
        by_caption.setdefault(ex.captions[0], []).append(ex.load_image())
    same_class = next(imgs for imgs in by_caption.values() if len(imgs) > 1)
    assert same_class[0].size == (32, 32)
    assert same_class[0].tobytes() != same_class[1].tobytes()
    red_left = ShapesDataset().load(
        "test", {"size": 24, "colors": ["red"], "shapes": ["circle"], "positions": ["left"]}
    )
    img = red_left[0].load_image()
    # the shape really is red and on the left: the reddest pixels are in the left half
    reds = [
        (x, y)
        for x in range(64)
        for y in range(64)
        if img.getpixel((x, y))[0] > 180 > img.getpixel((x, y))[1] + 60
    ]
    assert reds and max(x for x, _ in reds) < 32
    assert red_left[0].captions == ["A red circle on the left."]


def test_shapes_options_are_validated_naming_the_key():
    spec = ShapesDataset()
    with pytest.raises(ConfigError, match=r"unknown option 'image_sise' \(did you mean 'image_size'\?\)"):
        spec.load("train", {"image_sise": 32})
    with pytest.raises(ConfigError, match=r"option 'colors'.*unknown colors \['teal'\]"):
        spec.load("train", {"colors": ["red", "teal"]})
    with pytest.raises(ConfigError, match="split_fractions"):
        spec.load("train", {"split_fractions": [0.5, 0.5, 0.5]})
    with pytest.raises(DataError, match="unknown split 'dev'"):
        spec.load("dev")


def test_stratified_splits_keep_a_test_example_of_every_class_even_when_small():
    assignment = stratified_splits({"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"]}, seed=0)
    for cls in "ab":
        assert sorted(assignment[f"{cls}{i}"] for i in (1, 2, 3)) == ["test", "train", "validation"]


def test_hash_split_of_an_image_does_not_depend_on_the_others():
    before = {f"img{i}": assign_split(f"img{i}", 3) for i in range(200)}
    assert {assign_split(f"img{i}", 3) for i in range(200)} == set(SPLITS)
    assert before == {f"img{i}": assign_split(f"img{i}", 3) for i in range(200)}
    assert before != {f"img{i}": assign_split(f"img{i}", 4) for i in range(200)}


# --------------------------------------------------------------------------------------- folder


def write_image(path, color=(200, 30, 30), fmt=None, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    lines = []
    for i in range(40):
        name = f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        write_image(root / name, (i * 6, 100, 200 - i * 4))
        lines.append(json.dumps({"file_name": name, "caption": f"picture number {i}"}))
    lines.append(json.dumps({"image": "img00.png", "captions": ["another caption of zero"]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_folder_splits_are_disjoint_deterministic_and_seeded(photo_folder):
    spec = FolderDataset()
    opts = {"path": str(photo_folder), "split_fractions": [0.5, 0.25, 0.25]}
    splits = load_all(spec, opts)
    assert_disjoint(splits)
    assert sorted(i for ids in ids_of(splits).values() for i in ids) == sorted(
        f"img{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(40)
    )
    assert ids_of(splits) == ids_of(load_all(spec, opts))
    assert ids_of(splits) != ids_of(load_all(spec, opts, seed=7))
    everything = {ex.id: ex for ds in splits.values() for ex in ds}
    assert everything["img00.png"].captions == ["picture number 0", "another caption of zero"]
    assert everything["img01.jpg"].load_image().size == (24, 24)


def test_folder_reads_csv_and_imagefolder_metadata(tmp_path):
    for i in range(12):
        write_image(tmp_path / "csv" / f"{i}.png")
        write_image(tmp_path / "meta" / "train" / f"{i}.png")
    rows = "file_name,captions\n" + "".join(f'{i}.png,"[""a {i}"", ""b {i}""]"\n' for i in range(12))
    (tmp_path / "csv" / "captions.csv").write_text(rows)
    meta = "".join(json.dumps({"file_name": f"train/{i}.png", "text": f"t{i}"}) + "\n" for i in range(12))
    (tmp_path / "meta" / "metadata.jsonl").write_text(meta)
    fractions = [0.34, 0.33, 0.33]
    csv_all = [
        ex
        for s in SPLITS
        for ex in FolderDataset().load(s, {"path": tmp_path / "csv", "split_fractions": fractions})
    ]
    assert sorted(ex.captions for ex in csv_all)[0] == ["a 0", "b 0"]
    meta_all = [
        ex
        for s in SPLITS
        for ex in FolderDataset().load(s, {"path": tmp_path / "meta", "split_fractions": fractions})
    ]
    assert {ex.id for ex in meta_all} == {f"train/{i}.png" for i in range(12)}
    assert all(ex.captions == [f"t{ex.id[6:-4]}"] for ex in meta_all)


def break_folder(root):
    (root / "img03.jpg").unlink()  # missing
    (root / "img05.jpg").write_bytes((root / "img05.jpg").read_bytes()[:200])  # truncated JPEG
    (root / "img06.png").write_bytes(b"not an image at all")


def test_folder_bad_images_are_an_error_naming_the_files_and_the_fix(photo_folder):
    break_folder(photo_folder)
    with pytest.raises(DataError) as info:
        FolderDataset().load("train", {"path": photo_folder})
    msg = str(info.value)
    assert "\n" not in msg
    assert "3 of 40 images cannot be used" in msg
    assert "1 missing: img03.jpg" in msg and "2 unreadable: img05.jpg, img06.png" in msg
    assert "on_bad_image=skip" in msg


def test_folder_skip_mode_leaves_bad_images_out_with_one_summary_line(photo_folder):
    break_folder(photo_folder)
    opts = {"path": photo_folder, "on_bad_image": "skip", "split_fractions": [0.5, 0.25, 0.25]}
    with pytest.warns(DataWarning) as record:
        splits = load_all(FolderDataset(), opts)
    lines = [str(w.message) for w in record]
    assert (
        f"folder {photo_folder}: 3 of 40 images skipped (1 missing: img03.jpg; 2 unreadable: img05.jpg, img06.png)"
        in lines
    )
    kept = {i for ids in ids_of(splits).values() for i in ids}
    assert len(kept) == 37 and not kept & {"img03.jpg", "img05.jpg", "img06.png"}
    assert splits["train"].info["skipped"] == ["img03.jpg", "img05.jpg", "img06.png"]


def test_folder_check_decodes_so_a_png_that_passes_verify_is_caught(photo_folder, hostile_png):
    (photo_folder / "img08.png").write_bytes(hostile_png(64, 64, cut=0.5))  # valid CRCs, cut pixel data
    (photo_folder / "img10.png").write_bytes(hostile_png(20000, 20000, rows=0))  # a decompression bomb
    with pytest.raises(DataError) as info:
        FolderDataset().load("train", {"path": photo_folder})
    assert "2 unreadable: img08.png, img10.png" in str(info.value)
    assert "(img08.png is not a readable image (image file is truncated" in str(info.value)
    opts = {"path": photo_folder, "on_bad_image": "skip", "split_fractions": [1.0, 0.0, 0.0]}
    with pytest.warns(DataWarning, match="2 of 40 images skipped"):
        train = FolderDataset().load("train", opts)
    assert len(train) == 38 and all(ex.load_image() for ex in train)  # what passed, decodes
    assert set(train.info["problems"]) == {"img08.png", "img10.png"}


def test_folder_lists_every_bad_image_though_its_message_names_five(photo_folder):
    for i in range(0, 16, 2):
        (photo_folder / f"img{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        FolderDataset().load("train", {"path": photo_folder})
    assert "8 unreadable: img00.png, img02.png, img04.png, img06.png, img08.png, ... (3 more)" in str(
        info.value
    )
    assert sorted(info.value.problems) == [f"img{i:02d}.png" for i in range(0, 16, 2)]
    assert set(info.value.problems.values()) == {"is not a readable image (unknown format or corrupt data)"}


def test_folder_refuses_paths_outside_it_unread_unless_allowed(photo_folder, tmp_path, monkeypatch):
    import vlmkit.plugins.datasets.folder as folder

    outside = tmp_path / "outside.png"
    write_image(outside)
    (photo_folder / "link.png").symlink_to(outside)
    (photo_folder / "etc.png").symlink_to("/etc/hostname")
    lines = [
        json.dumps({"file_name": name, "caption": "out"})
        for name in ("../outside.png", "link.png", "etc.png")
    ]
    with (photo_folder / "captions.jsonl").open("a") as f:
        f.write("\n".join([*lines, json.dumps({"file_name": str(outside), "caption": "abs"})]) + "\n")
    read = []
    monkeypatch.setattr(folder, "read_image_file", lambda path: read.append(path) or Path(path).read_bytes())
    folder._CHECKED.clear()
    with pytest.raises(DataError) as info:
        FolderDataset().load("train", {"path": photo_folder})
    message = str(info.value)
    assert f"4 outside the folder: ../outside.png, {outside}, etc.png, link.png" in message
    assert "pass allow_outside=true to use it" in message and "\n" not in message
    assert not {p.name for p in map(Path, read)} & {"outside.png", "link.png", "etc.png", "hostname"}

    opts = {
        "path": photo_folder,
        "allow_outside": True,
        "on_bad_image": "skip",
        "split_fractions": [1.0, 0, 0],
    }
    with pytest.warns(DataWarning, match=r"1 of 44 images skipped \(1 unreadable: etc.png\)"):
        train = FolderDataset().load("train", opts)
    assert {"../outside.png", "link.png", str(outside)} <= {ex.id for ex in train}


def test_folder_fingerprint_changes_when_an_image_changes(photo_folder):
    opts = {"path": photo_folder, "split_fractions": [1.0, 0.0, 0.0]}
    before = FolderDataset().load("train", opts)
    again = FolderDataset().load("train", opts)
    assert before.fingerprint == again.fingerprint
    write_image(photo_folder / "img04.png", (1, 2, 3))  # same name, same size, new pixels
    assert FolderDataset().load("train", opts).fingerprint != before.fingerprint


def test_folder_check_is_remembered_across_runs_by_path_size_and_mtime(photo_folder, tmp_path, monkeypatch):
    import os

    from vlmkit.plugins.datasets import folder

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    decoded: list[str] = []
    verify = folder._verify
    monkeypatch.setattr(folder, "_verify", lambda path: decoded.append(path.name) or verify(path))

    def new_process():  # only what is on disk is remembered
        folder._CHECKED.clear()
        folder._READ_STORES.clear()

    new_process()
    first = FolderDataset().load("train", {"path": photo_folder})
    assert len(decoded) == 40
    assert len(list((tmp_path / "home" / "image-checks").glob("*.json"))) == 1

    new_process()
    decoded.clear()
    write_image(photo_folder / "img03.jpg", (1, 2, 3))  # changed: decoded again, and only it
    os.utime(photo_folder / "img05.jpg")  # touched: decoded again
    (photo_folder / "img09.jpg").write_bytes(b"not an image")
    with pytest.warns(DataWarning, match="1 of 40 images skipped"):
        again = FolderDataset().load("train", {"path": photo_folder, "on_bad_image": "skip"})
    assert sorted(decoded) == ["img03.jpg", "img05.jpg", "img09.jpg"]
    assert again.fingerprint != first.fingerprint  # the new content hashes, not the remembered ones

    new_process()
    decoded.clear()
    with pytest.warns(DataWarning, match="1 of 40 images skipped"):
        FolderDataset().load("train", {"path": photo_folder, "on_bad_image": "skip"})
    assert decoded == ["img09.jpg"]  # a bad image is never remembered: it may be fixed in place


def test_remembered_checks_follow_the_runs_cache_folder(photo_folder, tmp_path, monkeypatch):
    """``vlmkit train --cache-dir`` keeps them beside the features (``dataset_cache_root``), not in
    ``$VLMKIT_HOME``; a feature cache cleared there leaves them."""
    from vlmkit.plugins.datasets import folder
    from vlmkit.sdk.datasets import dataset_cache_root
    from vlmkit.train.features import FeatureCache

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    decoded: list[str] = []
    verify = folder._verify
    monkeypatch.setattr(folder, "_verify", lambda path: decoded.append(path.name) or verify(path))
    folder._CHECKED.clear()
    folder._READ_STORES.clear()
    with dataset_cache_root(tmp_path / "cache"):
        FolderDataset().load("train", {"path": photo_folder})
    assert len(decoded) == 40
    assert len(list((tmp_path / "cache" / "image-checks").glob("*.json"))) == 1
    assert not (tmp_path / "home" / "image-checks").exists()

    assert FeatureCache(tmp_path / "cache").clear() == 0  # no feature entry, and the checks stay
    folder._CHECKED.clear()  # a new process, the same cache folder: nothing decoded again
    folder._READ_STORES.clear()
    decoded.clear()
    with dataset_cache_root(tmp_path / "cache"):
        FolderDataset().load("train", {"path": photo_folder})
    assert decoded == []
    folder._CHECKED.clear()  # another cache folder remembers nothing
    folder._READ_STORES.clear()
    FolderDataset().load("train", {"path": photo_folder})
    assert len(decoded) == 40


FOLDER_WORKER = """
import json, sys
import torch.distributed as dist
from vlmkit.plugins.datasets import folder

decoded = []
verify = folder._verify
folder._verify = lambda path: decoded.append(path.name) or verify(path)
dist.init_process_group("gloo")
splits = [folder.FolderDataset().load(s, {"path": sys.argv[1]}) for s in ("train", "validation")]
record = {"decoded": decoded, "fingerprints": [d.fingerprint for d in splits]}
json.dump(record, open(f"{sys.argv[2]}/rank-{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def test_under_torch_distributed_rank_zero_alone_checks_the_folder(torchrun, photo_folder, tmp_path):
    (tmp_path / "worker.py").write_text(FOLDER_WORKER)
    home = {"VLMKIT_HOME": str(tmp_path / "home")}
    run = torchrun(tmp_path / "worker.py", photo_folder, tmp_path, env=home)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["decoded"]) == 40 and ranks[1]["decoded"] == []  # once, for both splits
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]


def slow_preparation(rank: int, world: int, root: str) -> None:
    """A rank of a process group whose collectives time out after 3 s (the default group's 30
    minutes, shrunk), while rank 0 alone prepares for 6 s (checking or downloading a dataset)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from vlmkit.core.ranks import from_rank_zero

    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=world, timeout=timedelta(seconds=3)
    )
    try:
        value = from_rank_zero(lambda: time.sleep(6) or ["checked", "images"], "checking images")
        Path(f"{root}/rank-{rank}.json").write_text(json.dumps(value))
    except RuntimeError as exc:  # the waiting rank's collective timed out
        Path(f"{root}/rank-{rank}.json").write_text(json.dumps(str(exc)[:200]))
    dist.destroy_process_group()


def test_ranks_wait_for_rank_zeros_preparation_past_the_default_collective_timeout(torchrun, tmp_path):
    codes = torchrun.join(torchrun.fork(slow_preparation, str(tmp_path)), timeout=120)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert results == [["checked", "images"]] * 2, results
    assert codes == [0, 0]


def test_folder_refuses_missing_folder_captions_and_empty_splits(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        FolderDataset().load("train", {"path": tmp_path / "nope"})
    with pytest.raises(DataError, match=r"no captions file \(looked for captions.jsonl"):
        FolderDataset().load("train", {"path": tmp_path})
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match="line 1 has no caption for a.png"):
        FolderDataset().load("train", {"path": tmp_path})
    (tmp_path / "captions.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="split 'test' is empty"):
        FolderDataset().load("test", {"path": tmp_path, "split_fractions": [1, 0, 0]})
    with pytest.raises(ConfigError, match="unknown option 'folder'"):
        FolderDataset().load("train", {"folder": tmp_path})
    with pytest.raises(ConfigError, match="option 'path' is required"):
        FolderDataset().load("train", {})


# --------------------------------------------------------------------------------------- mixing


def test_mix_concatenates_prefixes_ids_and_combines_fingerprints():
    shapes = ShapesDataset().load("test", {"size": 48})
    other = ShapesDataset().load("test", {"size": 48, "image_size": 32})
    mixed = mix([shapes, other])
    assert len(mixed) == len(shapes) + len(other)
    assert mixed[0].id == f"shapes/{shapes[0].id}"
    assert mixed[len(shapes)].id == f"shapes-2/{other[0].id}"
    assert mixed[-1].captions == other[len(other) - 1].captions
    assert mixed.fingerprint != mix([other, shapes]).fingerprint
    assert mixed.fingerprint == mix([shapes, other]).fingerprint
    assert mix([shapes]) is shapes
    with pytest.raises(IndexError):
        mixed[len(mixed)]
    named = mix([ListDataset([], "a"), shapes], names=["flickr30k", "coco"])
    assert named[0].id.startswith("coco/")


def test_data_sources_name_each_dataset_and_the_revision_its_loader_read():
    hub = ListDataset(
        [], "a", name="coco", info={"source": "org/data", "revision": "abc123", "splits_from": None}
    )
    local = ListDataset([], "b", name="folder", info={"split": "train", "problems": {}})
    assert data_sources(hub) == [{"name": "coco", "source": "org/data", "revision": "abc123"}]
    assert data_sources(mix([hub, local])) == [
        {"name": "coco", "source": "org/data", "revision": "abc123"},
        {"name": "folder"},
    ]


def test_no_warnings_for_clean_loads(photo_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FolderDataset().load("train", {"path": photo_folder})
        ShapesDataset().load("train")


# --------------------------------------------------------------------------------------- contract


def test_builtin_datasets_pass_the_plugin_contract_suite(photo_folder):
    from vlmkit.testing.contract import check_dataset

    assert check_dataset(ShapesDataset(), {"size": 240}) == {"train": 192, "validation": 24, "test": 24}
    check_dataset(FolderDataset(), {"path": str(photo_folder), "split_fractions": [0.5, 0.25, 0.25]})
    # flickr30k and coco: tests/plugins/test_hub_datasets.py, on copies in their real layouts


def test_an_unreadable_image_error_names_its_id_and_file_once(tmp_path):
    from vlmkit.core.contracts import CaptionExample

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as exc:
        CaptionExample(id="coco-123", captions=[], image=bad).load_image()
    message = str(exc.value)
    assert message == f"image 'coco-123' ({bad}) is not a readable image (unknown format or corrupt data)"
    with pytest.raises(DataError) as exc:
        CaptionExample(id=str(bad), captions=[], image=bad).load_image()
    assert str(exc.value).count(str(bad)) == 1
