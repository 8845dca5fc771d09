"""Figures for training at scale (issue 14), on this machine's CPUs.

    python benchmarks/scale.py [--images 30000] [--sections cache,loader,startup]

- ``cache``: feature-cache bytes and build time per image for SigLIP-base-sized features (a random
  ``SiglipVisionConfig()`` encoder, 224 px, 196 tokens x 768; no hub), stored as the full grid
  (196 tokens) and after the projection's parameter-free 4x4 avgpool (16 tokens), float16 as the
  cache stores them.
- ``loader``: one epoch-slice of ``CaptionTrainingSet`` + ``Collator`` batches (16 per batch) with
  ``num_workers`` 0 and 2: from the feature cache (a memmap) and from pixels (224 px images decoded
  and preprocessed, what an unfrozen encoder trains from).
- ``startup``: ``vlmkit train`` with tiny models (``--max-steps 1``) on a synthetic folder of
  ``--images`` 32 px PNGs (generated once into /tmp), and on a tenth of it: wall time and peak
  host memory (RSS) of the first run (checks every image, builds the feature cache) and of a second
  (image checks remembered, features cached). Memory should not grow with the folder beyond the
  memmap's pages.

``--smoke``: a one-layer SigLIP with base's 196 tokens, 4 images; 3 loader batches of 4; the
start-up's ``vlmkit train`` command line on a folder of 8 images with ``--help`` added (it checks
that every option is still taken, not the run: a run costs 15-60 s here). It checks the script,
its figures mean nothing; its folders go to a temporary one. ``--json PATH``: one JSON line per
figure.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

#: where the synthetic folders and caches live between runs (--smoke: a fresh temporary folder)
ROOT = Path(tempfile.gettempdir()) / "vlmkit-scale"


# --------------------------------------------------------------------------------------- cache


def cache_figures(n: int = 16, batch: int = 8, tiny: bool = False) -> dict:
    import numpy as np
    import torch
    from transformers import SiglipVisionModel

    checkpoint = harness.siglip_checkpoint(ROOT, tiny=tiny)  # base: 224 px, patch 16, 768 wide
    encoder = SiglipVisionModel.from_pretrained(checkpoint).eval()
    width = encoder.config.hidden_size
    pixels = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        encoder(pixel_values=pixels[:1])  # warm-up
    out = {}
    for tokens in (196, 16):
        path = ROOT / f"features-{tokens}.npy"
        ROOT.mkdir(parents=True, exist_ok=True)
        rows = np.lib.format.open_memmap(path, mode="w+", dtype="float16", shape=(n, tokens, width))
        started = time.perf_counter()
        for s in range(0, n, batch):
            with torch.no_grad():
                grid = encoder(pixel_values=pixels).last_hidden_state  # [B, 196, 768]
            if tokens == 16:  # the projection's avgpool: 14x14 -> 4x4, no parameters
                b = grid.shape[0]
                grid = (
                    torch.nn.functional.adaptive_avg_pool2d(grid.transpose(1, 2).reshape(b, width, 14, 14), 4)
                    .flatten(2)
                    .transpose(1, 2)
                )
            rows[s : s + batch] = grid[: n - s].numpy().astype("float16")
        rows.flush()
        seconds = time.perf_counter() - started
        del rows
        size = path.stat().st_size
        out[tokens] = {"bytes_per_image": size / n, "seconds_per_image": seconds / n}
        path.unlink()
    for tokens, f in out.items():
        print(
            f"  cache, {tokens:3d} tokens: {f['bytes_per_image'] / 1024:7.1f} KiB per image "
            f"({f['bytes_per_image'] * 31_783 / 2**30:5.2f} GiB for flickr30k's 31,783 images), "
            f"build {f['seconds_per_image']:.2f} s per image"
        )
    return out


# --------------------------------------------------------------------------------------- loader


def loader_figures(batches: int = 40, batch: int = 16) -> dict:
    import numpy as np
    import torch

    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.plugins.datasets.shapes import ShapesDataset
    from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint
    from vlmkit.train.data import CaptionTrainingSet, Collator

    torch.set_num_threads(1)  # the loader's own cost, whatever --threads gave the cache build
    n = batches * batch
    model = PrefixConditioningVLM.build(
        {
            "encoder": "siglip",
            "encoder_checkpoint": tiny_encoder_checkpoint("siglip", ROOT / "siglip-224", image_size=224),
            "decoder": "smollm",
            "decoder_checkpoint": tiny_decoder_checkpoint("llama", ROOT / "llama"),
        }
    )
    data = ShapesDataset().load("train", {"size": max(n * 2, 100), "image_size": 224})
    data = [data[i % len(data)] for i in range(n)]
    features = np.lib.format.open_memmap(ROOT / "loader.npy", mode="w+", dtype="float16", shape=(n, 16, 768))
    features[:] = 0.5
    features.flush()
    features = np.load(ROOT / "loader.npy", mmap_mode="r")
    out = {}
    for source, dataset in (
        ("features", CaptionTrainingSet(data, features)),
        ("pixels", CaptionTrainingSet(data, None, model.preprocess)),
    ):
        for workers in (0, 2):
            kwargs = {"num_workers": workers, "persistent_workers": False}
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch, collate_fn=Collator(model), **kwargs
            )
            started = time.perf_counter()
            iterator = iter(loader)
            next(iterator)
            first = time.perf_counter() - started
            for _ in iterator:
                pass
            seconds = time.perf_counter() - started
            per_batch = (seconds - first) / (batches - 1)
            out[f"{source}-{workers}"] = {"first_batch_s": first, "per_batch_s": per_batch}
            print(
                f"  loader, {source:8s} num_workers={workers}: first batch {first:.2f} s, "
                f"then {per_batch * 1e3:6.1f} ms per batch of {batch}"
            )
    return out


# --------------------------------------------------------------------------------------- startup


def synthetic_folder(n: int) -> Path:
    from PIL import Image

    folder = ROOT / f"folder-{n}"
    if (folder / "captions.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    lines = []
    for i in range(n):
        name = f"img{i:05d}.png"
        Image.new("RGB", (32, 32), colours[i % 4]).save(folder / name)  # 32 px: cheap to make
        lines.append(json.dumps({"file_name": name, "caption": f"Image number {i} in colour {i % 4}."}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def startup_figures(images: int, smoke: bool = False) -> dict:
    """``vlmkit train`` on folders of ``images // 10`` and ``images`` images, twice each. ``smoke``:
    the same command line on ``images`` once, with ``--help``: it checks that ``vlmkit train``
    still takes every option used here without the ~15 s (60 s on a busy machine) of a run."""
    from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint

    encoder = tiny_encoder_checkpoint("siglip", ROOT / "siglip-32", image_size=32)
    decoder = tiny_decoder_checkpoint("llama", ROOT / "llama")
    out = {}
    for n in (images,) if smoke else (images // 10, images):
        folder = synthetic_folder(n)
        home = ROOT / f"home-{n}"
        subprocess.run(["rm", "-rf", str(home)], check=True)
        for run in ("options",) if smoke else ("first", "second"):
            command = [
                sys.executable, "-m", "vlmkit.cli.main", "train",
                "--encoder", "siglip", "--encoder-checkpoint", encoder,
                "--decoder", "smollm", "--decoder-checkpoint", decoder,
                "--dataset", f"folder:path={folder}", "--max-steps", "1", "--batch-size", "4",
                "--set", "max_eval_samples=4", "--output", str(ROOT / f"run-{n}"), "--overwrite", "--quiet",
                *(["--help"] if smoke else []),
            ]  # fmt: skip
            env = {**os.environ, "VLMKIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
            script = (
                "import resource, subprocess, sys, time; t = time.perf_counter(); "
                "r = subprocess.run(sys.argv[1:]); "
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
            )
            done = subprocess.run(
                [sys.executable, "-c", script, *command], env=env, capture_output=True, text=True
            )
            seconds, rss_kib, rc = done.stdout.split()[-3:]
            if rc != "0":
                raise SystemExit(f"vlmkit train failed:\n{done.stderr[-3000:]}")
            out[f"{n}-{run}"] = {"seconds": float(seconds), "peak_rss_mib": int(rss_kib) / 1024}
            print(
                f"  vlmkit train, {n:6d} images, {run:6s} run: {float(seconds):6.1f} s, peak RSS {int(rss_kib) / 1024:6.0f} MiB"
            )
    return out


def main(argv=None) -> int:
    global ROOT
    parser = harness.parser(__doc__, threads=None)
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--sections", default="cache,loader,startup")
    args = parser.parse_args(argv)
    if args.smoke:
        ROOT, args.images = harness.workdir("scale"), 8
    out = harness.start(args, "scale")
    print(f"CPU: {harness.describe_machine()}")
    sections = args.sections.split(",")
    if "cache" in sections:
        for tokens, figures in cache_figures(*((4, 2, True) if args.smoke else ())).items():
            out.row(f"cache | {tokens} tokens", **figures)
    if "loader" in sections:
        for key, figures in loader_figures(*((3, 4) if args.smoke else ())).items():
            out.row(f"loader | {key}", **figures)
    if "startup" in sections:
        for key, figures in startup_figures(args.images, smoke=args.smoke).items():
            out.row(f"startup | {key}", **figures)
    out.row("this process", peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    expected = {
        "cache": ["cache | 196 tokens", "cache | 16 tokens"],
        "loader": [f"loader | {s}-{w}" for s in ("features", "pixels") for w in (0, 2)],
        "startup": [f"startup | {args.images}-{'options' if args.smoke else 'first'}"],
    }
    return out.finish([row for section in sections for row in expected[section]])


if __name__ == "__main__":
    sys.exit(main())
