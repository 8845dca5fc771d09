"""Tiny copies of the four hub caption datasets, in the layouts their repositories really have.

- ``nlphuji/flickr30k`` at ``refs/convert/parquet``: ``TEST/test/0000.parquet`` ...; columns
  image, caption (5), sentids, split (Karpathy's), img_id, filename; one hub split ``test``.
- ``Mozilla/flickr30k-transformed-captions-gpt4o``: ``data/test-0000N-of-0000M.parquet``; the same
  columns plus ``alt_text`` (one string) and ``objects``; sample JPEGs at the top.
- ``yerevann/coco-karpathy``: ``data/{train,restval,validation,test}-00000-of-00001.parquet``
  (filepath, filename, sentences, cocoid, url; no image bytes) and an older ``coco.parquet``
  beside ``data/`` that names no split.
- ``Mozilla/coco-gpt4o``: a ``save_to_disk`` folder pushed as is: ``dataset_dict.json`` listing
  train, test, validation (the COCO 2017 splits), each a folder of ``data-NNNNN-of-NNNNN.arrow``
  shards with ``state.json`` and ``dataset_info.json``; one row per image (image, image_id,
  coco_url, alt_text, objects), and shards that disagree: ``alt_text`` a string in some and a list
  in others, ``objects`` missing from one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

#: Karpathy's split of the tiny COCO: cocoid -> (split file, 2014 folder)
KARPATHY = {
    **{i: ("train", "train2014") for i in range(0, 8)},
    **{i: ("restval", "val2014") for i in (8, 9)},
    **{i: ("validation", "val2014") for i in (10, 11, 12)},
    **{i: ("test", "val2014") for i in (13, 14, 15)},
}
#: the COCO 2017 splits of the same images (train2017 holds Karpathy test and val images) plus
#: test2017 images that Karpathy never lists
COCO2017 = {
    "train": [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 14],
    "validation": [9, 11, 12, 15],
    "test": [100, 101, 102],
}


def _features(columns: dict):
    import datasets

    return datasets.Features(columns)


def flickr30k(root: Path, captions: str = "original", n: int = 30) -> Path:
    import datasets

    columns = {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
    if captions == "alt-text":
        columns |= {"alt_text": datasets.Value("string"), "objects": datasets.List(datasets.Value("string"))}
    rows: dict[str, list] = {k: [] for k in columns}
    for i in range(n):
        rows["image"].append(Image.new("RGB", (16, 16), (i * 8, 0, 0)))
        rows["caption"].append([f"photo {i} caption {k}" for k in range(5)])
        rows["sentids"].append([str(5 * i + k) for k in range(5)])
        rows["split"].append(["train", "train", "train", "val", "test"][i % 5])
        rows["img_id"].append(str(i))
        rows["filename"].append(f"{1000 + i}.jpg")
        if captions == "alt-text":
            rows["alt_text"].append(f"alt text of photo {i}")
            rows["objects"].append(["photo"])
    ds = datasets.Dataset.from_dict(rows, features=_features(columns))
    half = n // 2
    if captions == "original":
        files = [root / "TEST" / "test" / "0000.parquet", root / "TEST" / "test" / "0001.parquet"]
    else:
        files = [root / "data" / f"test-0000{k}-of-00002.parquet" for k in range(2)]
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / "example1.jpg")
    for file, rows_range in zip(files, (range(half), range(half, n)), strict=True):
        file.parent.mkdir(parents=True, exist_ok=True)
        ds.select(rows_range).to_parquet(str(file))
    return root


def coco_karpathy(
    root: Path, image_root: Path | None = None, url_base: str = "http://images.cocodataset.org"
) -> Path:
    import datasets

    columns = {
        "filepath": datasets.Value("string"),
        "filename": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")),
        "cocoid": datasets.Value("int64"),
        "url": datasets.Value("string"),
    }
    by_split: dict[str, dict[str, list]] = {}
    for i, (split, folder) in KARPATHY.items():
        rows = by_split.setdefault(split, {k: [] for k in columns})
        name = f"COCO_{folder}_{i:012d}.jpg"
        rows["filepath"].append(folder)
        rows["filename"].append(name)
        rows["sentences"].append([f"coco {i} a", f"coco {i} b"])
        rows["cocoid"].append(i)
        rows["url"].append(f"{url_base}/{folder}/{name}")
        if image_root is not None:
            (image_root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), (0, i * 10, 0)).save(image_root / folder / name)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in by_split.items():
        datasets.Dataset.from_dict(rows, features=_features(columns)).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    stray = {k: [v[0]] for k, v in by_split["train"].items()} | {"cocoid": [999]}
    datasets.Dataset.from_dict(stray, features=_features(columns)).to_parquet(str(root / "coco.parquet"))
    return root


def coco_gpt4o(root: Path, train_shards: int = 3) -> Path:
    """The alt_text of shard k of train is a string for even k, a list for odd k; the last
    train shard lacks ``objects``."""
    import datasets

    def shard(ids: list[int], as_list: bool, objects: bool):
        columns = {
            "image_id": datasets.Value("int64"),
            "coco_url": datasets.Value("string"),
            "image": datasets.Image(),
            "alt_text": datasets.List(datasets.Value("string")) if as_list else datasets.Value("string"),
        }
        if objects:
            columns["objects"] = datasets.List(datasets.Value("string"))
        rows = {
            "image_id": ids,
            "coco_url": [f"http://images.cocodataset.org/x/{i:012d}.jpg" for i in ids],
            "image": [Image.new("RGB", (12, 10), (i, 50, 0)) for i in ids],
            "alt_text": [[f"alt {i}"] if as_list else f"alt {i}" for i in ids],
        }
        if objects:
            rows["objects"] = [["thing"] for _ in ids]
        return datasets.Dataset.from_dict(rows, features=_features(columns))

    scratch = root.parent / f".{root.name}-scratch"
    for split, ids in COCO2017.items():
        n = train_shards if split == "train" else 1
        chunks = [ids[k::n] for k in range(n)]
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for k, chunk in enumerate(chunks):
            part = shard(chunk, as_list=k % 2 == 1, objects=not (split == "train" and k == n - 1))
            part.save_to_disk(str(scratch / f"{split}{k}"))
            name = f"data-{k:05d}-of-{n:05d}.arrow"
            shutil.copy(scratch / f"{split}{k}" / "data-00000-of-00001.arrow", folder / name)
            files.append(name)
            if k == 0:  # what save_to_disk wrote for the first shard describes the split
                state = json.loads((scratch / f"{split}0" / "state.json").read_text())
                shutil.copy(scratch / f"{split}0" / "dataset_info.json", folder / "dataset_info.json")
        state["_data_files"] = [{"filename": f} for f in files]
        (folder / "state.json").write_text(json.dumps(state))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test", "validation"]}))
    shutil.rmtree(scratch)
    return root
