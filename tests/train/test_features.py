"""The encoder-feature cache: computed once, keyed on everything that changes features, never
served stale, safe against interrupted writes, truncated files and several ranks."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.core.errors import DataError
from vlmkit.core.projection import ProjectionConfig
from vlmkit.plugins.datasets.folder import FolderDataset
from vlmkit.plugins.datasets.shapes import ShapesDataset
from vlmkit.sdk.datasets import ListDataset
from vlmkit.train.features import FeatureCache


class FakeEncoder(torch.nn.Module):
    """The smallest thing satisfying ``VisionEncoder``: a patchifying conv that counts its calls."""

    def __init__(self, image_size: int = 32, patch: int = 8, dim: int = 6, seed: int = 0, fail_at: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dim, patch, stride=patch)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        self.image_size = image_size
        side = image_size // patch
        self.num_tokens, self.feature_dim, self.grid = side * side, dim, (side, side)
        self.calls = 0
        self.fail_at = fail_at  # raise on this call (1-based), to simulate an interrupted run

    def preprocess(self, images):
        arrays = [
            np.asarray(im.resize((self.image_size, self.image_size)), dtype=np.float32) / 255 for im in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def forward(self, pixel_values):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.conv(pixel_values).flatten(2).transpose(1, 2)

    def fingerprint(self) -> str:
        weights = hashlib.sha256(
            b"".join(p.detach().float().numpy().tobytes() for p in self.parameters())
        ).hexdigest()
        return f"fake-encoder:size={self.image_size}:weights={weights[:16]}"

    def layers(self):
        return [self.conv]


def shapes_data(size: int = 40) -> ListDataset:
    return ShapesDataset().load("train", {"size": size, "image_size": 32, "split_fractions": [1, 0, 0]})


def expected(encoder, data) -> np.ndarray:
    with torch.no_grad():
        return encoder(encoder.preprocess([ex.load_image() for ex in data])).numpy()


def entries(root: Path) -> list[str]:
    """Complete-looking entries (``<key>/``), not runs in progress (``<key>.partial/``)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and "." not in p.name)


def test_miss_computes_once_then_hits_without_calling_the_encoder(tmp_path):
    data, encoder = shapes_data(), FakeEncoder()
    cache = FeatureCache(tmp_path)
    feats = cache.features_for(encoder, data, batch_size=16, progress=False)
    assert encoder.calls == 3  # 40 images in batches of 16
    assert isinstance(feats, np.memmap) and feats.dtype == np.float16 and not feats.flags.writeable
    assert feats.shape == (40, 16, 6)
    np.testing.assert_allclose(feats, expected(FakeEncoder(), data), atol=2e-3, rtol=1e-2)

    again = FeatureCache(tmp_path).features_for(encoder, shapes_data(), batch_size=16, progress=False)
    assert encoder.calls == 3
    np.testing.assert_array_equal(again, feats)
    assert cache.load(encoder, data) is not None
    meta = json.loads((tmp_path / entries(tmp_path)[0] / "meta.json").read_text())
    assert meta["complete"] and meta["shape"] == [40, 16, 6] and meta["dtype"] == "float16"
    assert meta["encoder"] == encoder.fingerprint() and meta["dataset"] == data.fingerprint


def test_every_key_component_invalidates(tmp_path):
    cache = FeatureCache(tmp_path)
    data = shapes_data()
    base = cache.key(FakeEncoder(), data).digest
    keys = {
        "image size": cache.key(FakeEncoder(image_size=40), data),
        "weights": cache.key(FakeEncoder(seed=1), data),
        "dataset": cache.key(FakeEncoder(), shapes_data(size=48)),
        "dtype": cache.key(FakeEncoder(), data, dtype="float32"),
        "encoder dtype": cache.key(FakeEncoder().to(torch.bfloat16), data),
        "avgpool": cache.key(FakeEncoder(), data, projection=ProjectionConfig(reduction="avgpool", tokens=4)),
        "avgpool tokens": cache.key(
            FakeEncoder(), data, projection=ProjectionConfig(reduction="avgpool", tokens=9)
        ),
        "pixel shuffle": cache.key(
            FakeEncoder(), data, projection=ProjectionConfig(reduction="pixel_shuffle")
        ),
        "factor": cache.key(
            FakeEncoder(), data, projection=ProjectionConfig(reduction="pixel_shuffle", factor=4)
        ),
    }
    for what, key in keys.items():
        assert key.digest != base, what
    assert len({k.digest for k in keys.values()}) == len(keys)

    # each change really recomputes, next to (not over) the old entry
    encoder = FakeEncoder()
    cache.features_for(encoder, data, progress=False)
    bigger = FakeEncoder(image_size=40)
    assert cache.features_for(bigger, data, progress=False).shape == (40, 25, 6)
    assert bigger.calls == 2
    f32 = cache.features_for(encoder, data, dtype="float32", progress=False)
    assert f32.dtype == np.float32 and encoder.calls == 4
    assert len(entries(tmp_path)) == 3


def test_a_changed_image_file_changes_the_folder_fingerprint_and_recomputes(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(root / f"{i}.png")
    (root / "captions.jsonl").write_text(
        "".join(f'{{"file_name": "{i}.png", "caption": "c{i}"}}\n' for i in range(6))
    )
    opts = {"path": root, "split_fractions": [1, 0, 0]}
    cache, encoder = FeatureCache(tmp_path / "cache"), FakeEncoder()
    before = np.array(cache.features_for(encoder, FolderDataset().load("train", opts), progress=False))
    assert encoder.calls == 1
    cache.features_for(encoder, FolderDataset().load("train", opts), progress=False)
    assert encoder.calls == 1
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "3.png")
    after = cache.features_for(encoder, FolderDataset().load("train", opts), progress=False)
    assert encoder.calls == 2
    changed = (
        FolderDataset()
        .load("train", opts)
        .examples.index(next(ex for ex in FolderDataset().load("train", opts) if ex.id == "3.png"))
    )
    assert not np.array_equal(after[changed], before[changed])


def test_truncated_cache_file_is_detected_and_recomputed(tmp_path):
    data, encoder = shapes_data(), FakeEncoder()
    cache = FeatureCache(tmp_path)
    good = np.array(cache.features_for(encoder, data, progress=False))
    npy = tmp_path / entries(tmp_path)[0] / "features.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="truncated"):
        assert cache.load(encoder, data) is None
    with pytest.warns(UserWarning, match="recomputing"):
        again = cache.features_for(encoder, data, progress=False)
    assert encoder.calls == 4
    np.testing.assert_array_equal(again, good)
    assert entries(tmp_path) == [npy.parent.name]


def test_an_entry_not_marked_complete_is_not_used(tmp_path):
    data, encoder = shapes_data(), FakeEncoder()
    cache = FeatureCache(tmp_path)
    cache.features_for(encoder, data, progress=False)
    meta_path = tmp_path / entries(tmp_path)[0] / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "complete": False}))
    with pytest.warns(UserWarning, match="does not mark it complete"):
        cache.features_for(encoder, data, progress=False)
    assert encoder.calls == 4


def test_interrupted_run_leaves_no_complete_looking_cache_and_resumes(tmp_path):
    data = shapes_data(size=64)
    cache = FeatureCache(tmp_path)
    interrupted = FakeEncoder(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        cache.features_for(interrupted, data, batch_size=8, progress=False)
    key = cache.key(interrupted, data)
    assert not cache.path(key).exists()
    assert cache.load(interrupted, data) is None
    progress = json.loads((tmp_path / f"{key.digest}.partial" / "rows-0-64" / "progress.json").read_text())
    assert progress["done"] == 16  # two batches made it to disk before the third failed

    resumed = FakeEncoder()
    feats = cache.features_for(resumed, data, batch_size=8, progress=False)
    assert resumed.calls == 6  # only the 48 missing images
    assert entries(tmp_path) == [key.digest]
    np.testing.assert_allclose(feats, expected(FakeEncoder(), data), atol=2e-3, rtol=1e-2)


def test_encoder_problems_are_clear_errors_and_leave_no_entry(tmp_path):
    data = shapes_data(size=24)
    cache = FeatureCache(tmp_path)

    class Huge(FakeEncoder):
        def forward(self, pixel_values):
            return super().forward(pixel_values) * 1e6

    with pytest.raises(DataError, match="non-finite features .* try dtype float32"):
        cache.features_for(Huge(), data, progress=False)
    assert cache.features_for(Huge(), data, dtype="float32", progress=False).max() > 65504

    liar = FakeEncoder()
    liar.num_tokens = 5
    with pytest.raises(
        DataError, match=r"encoder returned features of shape \(24, 16, 6\), expected \(24, 5, 6\)"
    ):
        cache.features_for(liar, data, progress=False)
    broken = ListDataset(list(data.examples), "broken")
    broken.examples[3] = type(data[3])(id="bad.jpg", captions=["x"], image=tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="bad.jpg"):
        cache.features_for(FakeEncoder(), broken, progress=False)
    assert len(entries(tmp_path)) == 1  # only the float32 one: failed runs left only .partial folders


def test_pixels_follow_the_encoder_dtype(tmp_path):
    encoder = FakeEncoder().to(torch.bfloat16)  # as on a GPU in half precision
    data = shapes_data(size=24)
    feats = FeatureCache(tmp_path).features_for(encoder, data, progress=False)
    assert feats.dtype == np.float16
    np.testing.assert_allclose(feats, expected(FakeEncoder(), data), atol=0.05, rtol=0.05)


def test_progress_bar_runs(tmp_path, capsys):
    FeatureCache(tmp_path).features_for(FakeEncoder(), shapes_data(size=24), progress=True)


def _rank(rank: int, world: int, root: str, results) -> None:
    """One of two ranks, in a forked process (torch is already imported: no start-up cost)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    out = {"rank": rank}
    try:
        # 1. ranks without a process group (RANK/WORLD_SIZE only) meet at the cache's file lock
        encoder = FakeEncoder()
        FeatureCache(f"{root}/lock").features_for(encoder, shapes_data(), batch_size=8, progress=False)
        out["lock"] = encoder.calls
        # 2. with a process group, each rank computes its half of the rows
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
        encoder = FakeEncoder(seed=1)
        feats = FeatureCache(f"{root}/dist").features_for(
            encoder, shapes_data(), batch_size=8, progress=False
        )
        out["dist"], out["features"] = encoder.calls, np.array(feats)
        # 3. every rank has it: nobody computes or waits
        encoder = FakeEncoder(seed=1)
        FeatureCache(f"{root}/dist").features_for(encoder, shapes_data(), batch_size=8, progress=False)
        out["again"] = encoder.calls
        # 4. a rank that cannot see the folder the other writes: a one-line error on both, no wait
        try:
            FeatureCache(f"{root}/node-{rank}").features_for(
                FakeEncoder(seed=2), shapes_data(), progress=False
            )
        except DataError as exc:
            out["unshared"] = str(exc)
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out["error"] = repr(exc)
    results.put(out)


def test_ranks_split_the_rows_and_build_the_cache_one_process_builds(torchrun, tmp_path):
    results = multiprocessing.get_context("fork").Queue()
    procs = torchrun.fork(_rank, str(tmp_path), results)
    by_rank = {}
    try:
        for _ in procs:
            out = results.get(timeout=60)
            by_rank[out["rank"]] = out
    finally:
        torchrun.join(procs, timeout=10)
    assert all("error" not in r for r in by_rank.values()), by_rank
    r0, r1 = by_rank[0], by_rank[1]
    assert sorted([r0["lock"], r1["lock"]]) == [0, 5]  # 40 images, batches of 8, computed once
    assert [r0["dist"], r1["dist"]] == [3, 3]  # 20 rows each: batches of 8, 8 and 4
    assert [r0["again"], r1["again"]] == [0, 0]
    one_process = FeatureCache(tmp_path / "single").features_for(
        FakeEncoder(seed=1), shapes_data(), batch_size=8, progress=False
    )
    np.testing.assert_array_equal(r0["features"], one_process)
    np.testing.assert_array_equal(r1["features"], one_process)
    assert entries(tmp_path / "dist") == entries(tmp_path / "single")  # the same key, one entry
    for r in (r0, r1):
        assert "cannot see the files rank" in r["unshared"] and "share the cache folder" in r["unshared"]
        assert "\n" not in r["unshared"]


def test_a_pooled_run_stores_k_tokens_and_trains_as_from_pixels(tmp_path):
    """The cache stores the avgpool output (4 of 16 tokens); the projection takes it as it is, and
    three AdamW steps from the cache give the losses of three steps from the images."""
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

    config = {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", tmp_path / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", tmp_path / "llama"),
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }
    data = ListDataset(shapes_data(size=24).examples[:8], "eight shapes")
    captions = [ex.captions[0] for ex in data]

    def model():
        torch.manual_seed(0)
        return PrefixConditioningVLM.build(config, seed=0)

    vlm = model()
    assert vlm.encoder.num_tokens == 16
    cache = FeatureCache(tmp_path / "cache")
    projection = vlm.settings.projection
    feats = cache.features_for(vlm.encoder, data, dtype="float32", projection=projection, progress=False)
    assert feats.shape == (8, 4, vlm.encoder.feature_dim)
    meta = json.loads((tmp_path / "cache" / entries(tmp_path / "cache")[0] / "meta.json").read_text())
    assert meta["reduction"] == "avgpool:4" and meta["num_tokens"] == 4
    pixels = vlm.preprocess([ex.load_image() for ex in data])

    def losses(vlm, **inputs) -> list[float]:
        batch = vlm.tokenize(captions).to_dict()
        optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3)
        out = []
        for _ in range(3):
            loss = vlm(**batch, **inputs)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    from_cache = losses(vlm, features=torch.from_numpy(np.array(feats)))
    from_pixels = losses(model(), pixel_values=pixels)
    np.testing.assert_allclose(from_cache, from_pixels, rtol=1e-5)
    assert from_cache[-1] < from_cache[0]
