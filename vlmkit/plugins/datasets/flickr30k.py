"""``flickr30k``: Flickr30k (31,014 photos in Karpathy's split, 5 captions each) from the Hugging Face hub.

``captions=original`` reads ``nlphuji/flickr30k`` at revision ``refs/convert/parquet``: that
repository's main branch holds a loading script, which ``datasets`` 4 and later no longer run;
the hub's automatic parquet export of it holds the same rows (``image``, ``caption`` (5),
``sentids``, ``split``, ``img_id``, ``filename``). ``captions=alt-text`` reads
``Mozilla/flickr30k-transformed-captions-gpt4o``: the same images with one GPT-4o rewrite per
image (``alt_text``) made for alt text, which Firefox's local alt-text model trains on. Both carry
Karpathy's train/val/test split in their ``split`` column, which is used as is (``splits=hash``
to choose a seeded split instead). Images are identified by ``img_id`` in both, so the two
caption variants split their images the same way.

Revisions: ``nlphuji/flickr30k`` is read at the named ref ``refs/convert/parquet`` (the hub's
parquet export, ``TEST/test/0000.parquet`` ... ``0008.parquet``; the full sha of that branch's
head was not found, and the export bot adds commits to it); the alt-text dataset is pinned to
commit 94cd884, the hub's parquet export of its main branch at e5c7768 (the same three shards).
Override either with ``revision=``. Offline, pass ``path=`` a copy made with
``huggingface_hub.snapshot_download(ID, repo_type='dataset', revision=REV, local_dir=DIR)``
(the error message spells it out); the files are read shard by shard.
"""

from __future__ import annotations

from typing import ClassVar

import vlmkit
from vlmkit.plugins.datasets._hub import HubCaptionDataset, HubSource

ORIGINAL = HubSource(
    "nlphuji/flickr30k",
    revision="refs/convert/parquet",
    captions_column="caption",
    id_column="img_id",
    split_column="split",
    image_column="image",
)
ALT_TEXT = HubSource(
    "Mozilla/flickr30k-transformed-captions-gpt4o",
    revision="94cd884e427ea8326201e32514e8459e8bf751a9",
    captions_column="alt_text",
    id_column="img_id",
    split_column="split",
    image_column="image",
)


class Flickr30kDataset(HubCaptionDataset):
    name: ClassVar[str] = "flickr30k"
    description: ClassVar[str] = "Flickr30k from the HF hub, Karpathy splits; captions=original|alt-text"
    default_checkpoint: ClassVar[str | None] = ORIGINAL.dataset_id
    checkpoints: ClassVar[dict[str, str]] = {
        "original": f"{ORIGINAL.dataset_id} (revision {ORIGINAL.revision}): 5 human captions per image",
        "alt-text": f"{ALT_TEXT.dataset_id} (revision {ALT_TEXT.revision}): one GPT-4o alt-text rewrite per image",
    }
    sources: ClassVar[dict[str, HubSource]] = {"original": ORIGINAL, "alt-text": ALT_TEXT}


@vlmkit.hookimpl
def register_datasets(register):
    register(Flickr30kDataset())
