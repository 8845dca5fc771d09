"""``coco``: MS-COCO captions from the Hugging Face hub, always on Karpathy's split.

``captions=original`` reads ``yerevann/coco-karpathy`` (files ``data/{train,restval,validation,
test}-00000-of-00001.parquet``; columns ``filepath``, ``filename``, ``sentences``, ``cocoid``,
``url``): Karpathy's split (113k/5k/5k images once restval joins train) with 5 human captions per
image. It holds no image bytes: pass ``image_root=`` your COCO folder (with ``train2014/`` and
``val2014/``) to read local files; without it the split's images are downloaded from their URLs
when the split loads (in parallel, resumable, retried, at most 32 MB each; into
``$VLMKIT_HOME/images/`` or ``download_dir=``), and those that fail are left out, listed in
``failed-downloads.tsv`` there and in the run's bad-images file.

``captions=alt-text`` reads ``Mozilla/coco-gpt4o``: one row per COCO 2017 image (``image``,
``image_id``, ``alt_text``, ...) with a GPT-4o alt-text rewrite, in a ``save_to_disk`` folder of
~160 arrow shards whose ``train``/``validation``/``test`` are the *COCO 2017* splits. COCO's
train2017 holds most of Karpathy's test images, so those splits are not used: each image takes
its split from Karpathy's by COCO image id (read from ``yerevann/coco-karpathy``, or
``karpathy_path=`` a local copy), and images Karpathy does not list (COCO test2017) train. Mixing
``coco`` with ``coco:captions=alt-text``, or scoring one on the other's test split, therefore
never puts a test or validation image into training; ``splits=hash`` is refused for the same
reason. Its shards disagree on ``alt_text`` (a string in some, a list in others), which makes
``datasets.load_dataset`` fail with ``CastError``: vlmkit reads them one by one.

Revisions are pinned (override with ``revision=``): ``Mozilla/coco-gpt4o`` at its main commit
70f916d, ``yerevann/coco-karpathy`` at b6cdca8 (the tree of main, which merged it as 448fdb1).
Offline, pass ``path=`` a copy made with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

import vlmkit
from vlmkit.plugins.datasets._hub import HubCaptionDataset, HubOptions, HubSource

ORIGINAL = HubSource(
    "yerevann/coco-karpathy",
    revision="b6cdca8a4fe0f67b7bdcb03d6ed2def420f5a9dd",
    captions_column="sentences",
    id_column="cocoid",
    split_column="split",
)
ALT_TEXT = HubSource(
    "Mozilla/coco-gpt4o",
    revision="70f916d6fe4b20ef8a20d3b44bc39290387e3a73",
    captions_column="alt_text",
    id_column="image_id",
    image_column="image",
    splits_from=ORIGINAL,
)


class CocoOptions(HubOptions):
    image_root: str | None = Field(
        None,
        description="folder of the COCO images (<image_root>/<filepath>/<filename>: train2014/, val2014/); "
        "without it captions=original downloads them",
    )
    karpathy_path: str | None = Field(
        None, description="captions=alt-text: a local copy of yerevann/coco-karpathy, whose split it takes"
    )
    download_dir: str | None = Field(
        None, description="where downloaded images go (default $VLMKIT_HOME/images/<dataset>)"
    )
    download_workers: int = Field(16, ge=1, le=128, description="parallel downloads")


class CocoDataset(HubCaptionDataset):
    name: ClassVar[str] = "coco"
    description: ClassVar[str] = "COCO captions from the HF hub, Karpathy split; captions=original|alt-text"
    options: ClassVar[type[HubOptions]] = CocoOptions
    default_checkpoint: ClassVar[str | None] = ORIGINAL.dataset_id
    checkpoints: ClassVar[dict[str, str]] = {
        "original": f"{ORIGINAL.dataset_id} (revision {ORIGINAL.revision}): 5 human captions per image; "
        "images from image_root= or downloaded from their URLs",
        "alt-text": f"{ALT_TEXT.dataset_id} (revision {ALT_TEXT.revision}): GPT-4o alt text per COCO image, "
        "on Karpathy's split by image id",
    }
    sources: ClassVar[dict[str, HubSource]] = {"original": ORIGINAL, "alt-text": ALT_TEXT}
    hash_splits_refused: ClassVar[str | None] = (
        "coco keeps Karpathy's split, so that no mix of its caption variants trains on a Karpathy test "
        "or validation image"
    )


@vlmkit.hookimpl
def register_datasets(register):
    register(CocoDataset())
