"""``flickr30k``: Flickr30k (31,783 photos, 5 captions each) from the Hugging Face hub.

``captions=original`` reads ``nlphuji/flickr30k`` at revision ``refs/convert/parquet``: that
repository's main branch holds a loading script, which ``datasets`` 4 and later no longer run;
the hub's automatic parquet export of it holds the same rows (``image``, ``caption`` (5),
``sentids``, ``split``, ``img_id``, ``filename``). ``captions=alt-text`` reads
``Mozilla/flickr30k-transformed-captions-gpt4o``: the same images with one GPT-4o rewrite per
image (``alt_text``) made for alt text, which Firefox's local alt-text model trains on. Both carry
Karpathy's train/val/test split in their ``split`` column, which is used as is (``splits=hash``
to choose a seeded split instead). Images are identified by ``img_id`` in both, so the two
caption variants split their images the same way.

Offline, pass ``path=`` a copy saved with ``datasets.load_dataset(ID).save_to_disk(DIR)``.
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
        "alt-text": f"{ALT_TEXT.dataset_id}: one GPT-4o alt-text rewrite per image",
    }
    sources: ClassVar[dict[str, HubSource]] = {"original": ORIGINAL, "alt-text": ALT_TEXT}


@vlmkit.hookimpl
def register_datasets(register):
    register(Flickr30kDataset())
