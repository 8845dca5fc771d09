"""``coco``: MS-COCO captions (2014 images, Karpathy split) from the Hugging Face hub.

``captions=original`` reads ``yerevann/coco-karpathy``: Karpathy's split (train, restval,
validation, test: 113k/5k/5k images once restval joins train) with 5 human captions per image in
``sentences``. It holds no image bytes, only ``filepath``/``filename`` and the image ``url``:
pass ``image_root=`` your COCO folder (with ``train2014/`` and ``val2014/``) to read local files;
without it each image is downloaded from its URL on first use (the feature cache keeps its
features, so once). ``captions=alt-text`` reads ``Mozilla/coco-gpt4o``: COCO images with GPT-4o
alt-text rewrites (``alt_text``), whose hub splits lack a test split, so its images are split by
a seeded hash of their id.

Offline, pass ``path=`` a copy saved with ``datasets.load_dataset(ID).save_to_disk(DIR)``.
"""

from __future__ import annotations

from typing import ClassVar

import vlmkit
from vlmkit.plugins.datasets._hub import HubCaptionDataset, HubSource

ORIGINAL = HubSource(
    "yerevann/coco-karpathy",
    captions_column="sentences",
    id_column="cocoid",
    split_column="split",
)
ALT_TEXT = HubSource("Mozilla/coco-gpt4o", captions_column="alt_text", image_column="image")


class CocoDataset(HubCaptionDataset):
    name: ClassVar[str] = "coco"
    description: ClassVar[str] = "COCO captions from the HF hub, Karpathy split; captions=original|alt-text"
    default_checkpoint: ClassVar[str | None] = ORIGINAL.dataset_id
    checkpoints: ClassVar[dict[str, str]] = {
        "original": f"{ORIGINAL.dataset_id}: 5 human captions per image; images from image_root= or URLs",
        "alt-text": f"{ALT_TEXT.dataset_id}: GPT-4o alt-text rewrites of COCO captions",
    }
    sources: ClassVar[dict[str, HubSource]] = {"original": ORIGINAL, "alt-text": ALT_TEXT}


@vlmkit.hookimpl
def register_datasets(register):
    register(CocoDataset())
