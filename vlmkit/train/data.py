"""What the training loop is fed: examples with cached features or pixels, batches of similar
caption length, and the collator that lays tokens out around the image slots."""

from __future__ import annotations

import math
import mmap
import random
import weakref
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from vlmkit.core.model import PrefixConditioningVLM

#: length grouping tells captions apart only in steps of this many characters (~4 tokens). Sorting
#: by exact length made every batch of the shapes demo one caption class (length follows colour
#: and shape words) and cost it 37 points of exact match at 100 steps (63% vs 100%); with buckets
#: its captions (25-31 characters) share one bucket and batches stay random. Wherever length
#: follows content this risk remains, so grouping is opt-in (``group_by_length``).
LENGTH_BUCKET = 16


class CaptionTrainingSet(torch.utils.data.Dataset):
    """Examples as the collator wants them: one reference caption (a random one of several,
    re-drawn every time the example is seen) and either cached features or pixel values."""

    def __init__(self, data, features=None, preprocess=None, limit: int | None = None) -> None:
        self.data = data
        self.features = features
        self.preprocess = preprocess
        self.length = min(len(data), limit) if limit else len(data)

    def __getstate__(self) -> dict[str, Any]:
        # a memmap pickles as an in-memory copy of the whole file: a spawned DataLoader worker
        # would get all the cached features. It gets where they are and opens them itself.
        state = dict(self.__dict__)
        if _MemmapAt.applies(self.features):
            state["features"] = _MemmapAt(self.features)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.features, _MemmapAt):
            self.features = self.features.open()

    def __len__(self) -> int:
        return self.length

    def caption_lengths(self) -> list[int]:
        """Each example's mean reference length in characters: a free stand-in for its token
        count (no tokenizer pass over the dataset), used to batch similar lengths together."""
        lengths = []
        for index in range(self.length):
            captions = self.data[index].captions
            lengths.append(round(sum(len(c) for c in captions) / max(len(captions), 1)))
        return lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.data[index]
        item: dict[str, Any] = {"caption": random.choice(example.captions)}
        if self.features is not None:
            item["features"] = torch.from_numpy(self.features[index].astype("float32"))
        else:
            item["pixel_values"] = self.preprocess([example.load_image()])[0]
        return item


class _MemmapAt:
    """Where a C-contiguous memmap (or a slice of one) lies in its file, to open it again."""

    def __init__(self, array: np.memmap) -> None:
        # a slice keeps its parent's ``offset``: the true one is counted from the mapping's start
        # (numpy maps from ``offset`` rounded down to the allocation granularity)
        mapped = np.frombuffer(array._mmap, dtype=np.uint8).ctypes.data
        self.offset = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY + array.ctypes.data - mapped
        self.filename, self.dtype, self.shape = array.filename, array.dtype, array.shape

    @staticmethod
    def applies(array: Any) -> bool:
        return (
            isinstance(array, np.memmap)
            and bool(array.filename)
            and getattr(array, "_mmap", None) is not None
            and array.flags.c_contiguous
        )

    def open(self) -> np.memmap:
        return np.memmap(self.filename, self.dtype, "r", self.offset, self.shape)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar caption length (``group_by_length``), in a fresh order every epoch.

    Lengths are counted in buckets of ``LENGTH_BUCKET`` characters. Each epoch the indices are
    shuffled, cut into groups of ``min(n // (4 * batch_size), 50)`` batches, and sorted by bucket
    within each group (transformers' ``get_length_grouped_indices``; the sort is stable, so the
    examples of one bucket stay in random order). The order of epoch ``e`` depends only on
    ``seed`` and ``e``, so a resumed run skips exactly the batches it had trained.
    """

    def __init__(self, dataset: CaptionTrainingSet, batch_size: int, seed: int = 0) -> None:
        self.buckets = [length // LENGTH_BUCKET for length in dataset.caption_lengths()]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.buckets, self.batch_size, generator=generator))


class SamplerEpoch(TrainerCallback):
    """Tells the length-grouped sampler which epoch starts, also after a resume mid-epoch (where
    accelerate's ``set_epoch`` does not reach a sampler behind its skip and shard wrappers)."""

    def __init__(self, trainer) -> None:
        self.trainer = weakref.ref(trainer)

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer()
        sampler = getattr(trainer, "length_sampler", None)
        if sampler is not None:  # state.epoch is exactly 0, 1.0, 2.0 at epoch starts, 1.33 on resume
            sampler.set_epoch(math.floor(state.epoch))


class CaptionTokenizer:
    """What laying captions out around the image slots takes, without the model's weights: the
    tokenizer, the decoder plugin (its formatting and stop tokens), the settings (prompt, format,
    max caption tokens), the pad id and the number of image slots.

    DataLoader workers receive the collator pickled (always under spawn, macOS's default): this
    is a few hundred kilobytes of tokenizer, the model would be all its weights. It runs the
    model's own ``format`` and ``tokenize``, so there is still one way to lay tokens out.
    """

    format = PrefixConditioningVLM.format
    tokenize = PrefixConditioningVLM.tokenize
    stop_token_ids = PrefixConditioningVLM.stop_token_ids
    device = torch.device("cpu")  # the collator's batches stay on the CPU: the Trainer moves them

    def __init__(self, model: PrefixConditioningVLM) -> None:
        self.tokenizer = model.tokenizer
        self.decoder_spec = model.decoder_spec
        self.settings = model.settings
        self.pad_token_id = model.pad_token_id
        self.num_prefix_tokens = model.num_prefix_tokens
        self._prompt_cache: dict = {}


class Collator:
    """Tokenizes captions around the image slots (see ``PrefixConditioningVLM.tokenize``), rows
    padded on the right to a multiple of ``pad_to_multiple_of`` when given (8 on CUDA); holds a
    ``CaptionTokenizer``, not the model."""

    def __init__(self, model: PrefixConditioningVLM, pad_to_multiple_of: int | None = None) -> None:
        self.layout = CaptionTokenizer(model)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # on the CPU (worker processes, pinned memory): the Trainer moves each batch to the device
        batch = self.layout.tokenize([it["caption"] for it in items], device="cpu").to_dict()
        extra = -batch["input_ids"].shape[1] % (self.pad_to_multiple_of or 1)
        if extra:  # masked like any padding: attention 0, no label, not an image slot
            fills = {
                "input_ids": self.layout.pad_token_id,
                "attention_mask": 0,
                "image_mask": False,
                "labels": -100,
            }
            batch = {k: torch.nn.functional.pad(v, (0, extra), value=fills[k]) for k, v in batch.items()}
        key = "features" if "features" in items[0] else "pixel_values"
        batch[key] = torch.stack([it[key] for it in items])
        return batch
