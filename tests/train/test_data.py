"""What DataLoader workers receive: the collator's tokenizer and formatting (not the model), and
where the cached features lie (not the features): spawn-started workers (macOS's default) get
each a pickled copy of the dataset and the collator."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.sdk.datasets import load_split
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint
from vlmkit.train.config import DatasetConfig
from vlmkit.train.data import CaptionTrainingSet, Collator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoWeights(pickle.Pickler):
    """Refuses what a worker must not receive: a module, a tensor, an array of any size."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module | torch.Tensor) or (isinstance(obj, np.ndarray) and obj.size > 64):
            raise AssertionError(f"a worker would receive a {type(obj).__name__}")
        return NotImplemented


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    NoWeights(buffer).dump(obj)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    model = PrefixConditioningVLM.build(
        {
            "encoder": "siglip",
            "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
            "decoder": "smollm",
            "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        }
    )
    data = load_split([DatasetConfig(name="shapes", options={"size": 72, "image_size": 32})], "train")
    rows = np.random.default_rng(0).standard_normal((len(data), 64, 32)).astype("float16")
    np.save(root / "features.npy", rows)
    features = np.load(root / "features.npy", mmap_mode="r")  # as the feature cache hands it over
    return model, CaptionTrainingSet(data, features), Collator(model)


def test_the_collator_and_the_dataset_pickle_without_weights_or_features(training_set):
    model, dataset, collator = training_set
    assert len(pickled(collator)) < 1_000_000  # the tokenizer and the formatting
    assert len(pickled(dataset)) < 50_000  # the examples' captions and the features' file name

    again = pickle.loads(pickled(dataset))
    assert isinstance(again.features, np.memmap)  # opened by the worker, from the same file
    assert np.array_equal(again.features, dataset.features)
    view = CaptionTrainingSet(dataset.data, dataset.features[5:9])  # a slice keeps its rows
    assert np.array_equal(pickle.loads(pickled(view)).features, dataset.features[5:9])

    captions = ["A red circle on the left.", "A blue square on the right, a long caption " * 8]
    want = model.tokenize(captions, device="cpu").to_dict()
    got = pickle.loads(pickled(collator)).layout.tokenize(captions, device="cpu").to_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_spawned_two_worker_loader_gives_the_batches_of_the_main_process(training_set):
    _, dataset, collator = training_set

    def batches(**kwargs):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator, **kwargs)
        return list(loader)

    want = batches(num_workers=0)
    got = batches(num_workers=2, multiprocessing_context="spawn")
    assert len(got) == len(want) == 3
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a["features"], b["features"])
        assert torch.equal(a["labels"], b["labels"])  # one reference caption per shape example


def test_loader_workers_by_default_only_where_they_pay(monkeypatch):
    from vlmkit.core.placement import Placement
    from vlmkit.train.config import TrainConfig
    from vlmkit.train.job import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    gpu, cpu = Placement("cuda", "bf16", "test"), Placement("cpu", "fp32", "test")

    def workers(placement, **settings):
        config = TrainConfig.model_validate({"datasets": [{"name": "shapes"}], **settings})
        return loader_workers(config, placement)

    assert workers(gpu) == 0  # from the feature cache: a memmap slice per batch
    assert workers(gpu, model={"unfreeze_encoder_layers": 1}) == 4  # images decoded every batch
    assert workers(gpu, feature_cache=False) == 4
    assert workers(cpu, feature_cache=False) == 0  # the CPU's cores train
    assert workers(cpu, feature_cache=False, num_workers=3) == 3  # as asked
