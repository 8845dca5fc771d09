"""Training's ``--eval-metrics`` split across ranks (``caption_and_score``, which
``VLMTrainer.evaluation_loop`` calls): each rank captions its share, rank 0 alone scores the
gathered rows, every rank gets the same metrics. Two gloo processes give the metrics of one.

Java is hidden (as in test_eval.py): the pure-Python tokenizer, no METEOR; what is tested is who
captions and who scores.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.evaluate.loop import caption_and_score, rank_batches
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT_S = 120
LIMIT = 7  # odd: the ranks' shares differ in size (4 and 3)
BATCH = 2  # the larger share takes 2 batches: the other rank captions one example again

WORKER = textwrap.dedent(
    """
    import json, shutil, sys, warnings
    import numpy as np, torch, torch.distributed as dist
    import vlmkit.evaluate.metrics as metrics
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.evaluate import loop
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train.config import DatasetConfig

    config, out, limit, batch = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    which = shutil.which
    shutil.which = lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    calls = {"scored": 0, "captioned": []}
    score_captions, generate = metrics.score_captions, PrefixConditioningVLM.generate

    def counting_score(*args, **kwargs):
        calls["scored"] += 1
        return score_captions(*args, **kwargs)

    def counting_generate(self, *args, **kwargs):
        captions = generate(self, *args, **kwargs)
        calls["captioned"].append(len(captions))
        return captions

    metrics.score_captions, PrefixConditioningVLM.generate = counting_score, counting_generate
    data = load_split([DatasetConfig(name="shapes", options={"size": 72, "image_size": 32})], "validation")
    model = PrefixConditioningVLM.build(config, seed=0)
    features = np.load(out + "/features.npy", mmap_mode="r")
    got = loop.caption_and_score(model, data, features=features, batch_size=batch, limit=limit)
    json.dump({"metrics": got, **calls}, open(f"{out}/rank-{rank}.json", "w"))
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-eval")
    return {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "max_caption_tokens": 6,
    }


def test_rank_batches_split_contiguously_with_as_many_batches_on_every_rank():
    shares = [rank_batches(7, 2, rank, 2) for rank in (0, 1)]
    assert shares[0] == ([[0, 1], [2]], 3)
    assert shares[1] == ([[3, 4], [5, 6]], 4)
    # one example, two ranks: the rank without a share captions it too (and drops the row)
    assert [rank_batches(1, 4, rank, 2) for rank in (0, 1)] == [([[0]], 0), ([[0]], 1)]
    assert rank_batches(0, 4, 1, 2) == ([], 0)
    assert rank_batches(5, 2) == ([[0, 1], [2, 3], [4]], 5)  # one process: everything


def test_two_ranks_caption_their_shares_score_once_and_agree_with_one_process(
    torchrun, config, tmp_path, monkeypatch
):
    import shutil

    from vlmkit.sdk.datasets import load_split
    from vlmkit.train.config import DatasetConfig

    data = load_split([DatasetConfig(name="shapes", options={"size": 72, "image_size": 32})], "validation")
    model = PrefixConditioningVLM.build(config, seed=0)
    with torch.no_grad():
        pixels = model.preprocess([data[i].load_image() for i in range(LIMIT)])
        np.save(tmp_path / "features.npy", model.encode(pixels).numpy())
    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    )
    with pytest.warns(UserWarning, match="java not found"):
        want = caption_and_score(model, data, features=features, batch_size=BATCH, limit=LIMIT)

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = torchrun(worker, json.dumps(config), tmp_path, LIMIT, BATCH, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]

    assert [r["scored"] for r in ranks] == [1, 0]  # one set of scorers, on rank 0
    # shares of 3 and 4 examples, in two batches each (rank 0 captions one example again)
    assert [r["captioned"] for r in ranks] == [[2, 1], [2, 2]]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank decides early stopping alike
    assert ranks[0]["metrics"] == pytest.approx(want)
    assert set(want) >= {"CIDEr", "BLEU-4", "exact_match"}
