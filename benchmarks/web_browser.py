"""Captions in Chromium against the Python ONNX runtime, side by side in one run: payload and ms
per caption for each web-export variant of one trained model; optionally the page's screenshot.

    python benchmarks/web_browser.py MODEL [--variants int8 int4 none] [--test-images 3] [--out DIR]
                                     [--screenshot docs/browser.png] [--json results.jsonl]

MODEL is a trained model folder (the demo model: ``vlmkit demo`` writes ``runs/demo``). Each
variant is exported with ``vlmkit export --format web --quantize V`` into ``DIR/V`` (kept and
reused when it is there), served on 127.0.0.1 with cross-origin isolation (so onnxruntime-web runs
its wasm threads) and opened in a headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
through ``vlmkit.testing.browser``; GPU off, so the wasm backend). The page captions scikit-image's
photos of the demo, then ``--test-images`` held-out test images of the dataset the model was
trained on (its manifest says which), one at a time; the Python ONNX runtime captions the same PNGs over the same folder (one warm-up caption first, as many
threads as the wasm backend's). Printed per variant: payload, load time, ms per caption in each,
and whether the token ids agree.

``--screenshot`` keeps the page of the first variant after its captions: docs/browser.md's
``docs/browser.png`` is made with ``--screenshot docs/browser.png`` on the trained demo model.
``--json PATH``: one JSON line per variant.

``--smoke`` needs no trained model and no Chromium: it builds a tiny random model (timm's test
EfficientNet + a 2-layer Llama, its manifest naming ``scenes``), exports the ``int8`` web variant,
captions 3 photos and 1 test image with the Python ONNX runtime, and, where Chromium, chromedriver
and selenium are installed, in the page too (without them it says so and measures the rest). It
checks the script, its figures mean nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import harness


def sample_images(model: Path, n: int):
    """``[(name, PIL image)]``: scikit-image's photos of the demo, then ``n`` held-out test images
    of the datasets ``model`` was trained on (its manifest's training config)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from vlmkit.recipes.demo import SKIMAGE_PHOTOS
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train.config import TrainConfig

    config = None
    if n:
        training = json.loads((model / "vlmkit.json").read_text()).get("training") or {}
        if not training.get("config"):
            raise SystemExit(f"{model} has no training config in its manifest; pass --test-images 0")
        config = TrainConfig.model_validate(training["config"])
    # photos first: the page shows the last caption first, so the images the model knows lead
    out = [
        (name, Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")) for name in SKIMAGE_PHOTOS
    ]
    if config:
        test = load_split(config.datasets, "test", seed=config.seed)
        name = config.datasets[0].name
        out += [(f"{name}-{i}", test[i].load_image().convert("RGB")) for i in range(min(n, len(test)))]
    return out


def crop_blank_bottom(png: Path, margin: int = 24) -> None:
    """Cut the page's empty white area below the last caption."""
    from PIL import Image, ImageOps

    image = Image.open(png).convert("RGB")
    box = ImageOps.invert(image.convert("L")).getbbox()
    if box and box[3] + margin < image.height:
        image.crop((0, 0, image.width, box[3] + margin)).save(png)


def summary(ms: list[float]) -> str:
    return f"median {statistics.median(ms):,.0f} (range {min(ms):,.0f}-{max(ms):,.0f})"


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=None)
    parser.add_argument("model", type=Path, nargs="?", help="a trained model folder (runs/demo)")
    parser.add_argument(
        "--variants", nargs="+", default=["int8", "int4", "none"], choices=["int8", "int4", "none"]
    )
    parser.add_argument("--test-images", type=int, default=3, help="held-out images of the model's dataset")
    parser.add_argument(
        "--out", type=Path, default=None, help="exports and images (default: runs/web-browser)"
    )
    parser.add_argument("--screenshot", type=Path, help="keep the first variant's page as this PNG")
    args = parser.parse_args(argv)
    if args.smoke == bool(args.model):
        parser.error("give MODEL, or --smoke (which builds a tiny model itself), not both")
    report = harness.start(args, "web_browser")

    from vlmkit.export import export_model
    from vlmkit.runtime.onnx import read_onnx_manifest
    from vlmkit.testing.browser import (
        BrowserMissing,
        browser_version,
        caption_in_page,
        chromium,
        python_captions,
        serve,
    )

    if args.smoke:
        args.out = args.out or harness.workdir("web-browser")
        args.model, args.variants, args.test_images = harness.tiny_model_folder(args.out), ["int8"], 1
    args.out = args.out or Path("runs/web-browser")
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = sample_images(args.model, args.test_images)
    (args.out / "images").mkdir(exist_ok=True)
    for name, image in pictures:
        image.save(args.out / "images" / f"{name}.png")
    # what both runtimes read: the PNGs as decoded back (the browser gets the files)
    from PIL import Image

    images = [Image.open(args.out / "images" / f"{n}.png").convert("RGB") for n, _ in pictures]
    cores = os.cpu_count() or 1
    threads = min(4, cores)  # vlmkit-web.js's wasm threads on a cross-origin-isolated page
    print(f"CPU: {harness.describe_machine()}")

    with contextlib.ExitStack() as stack:
        base = stack.enter_context(serve(args.out))
        try:
            driver = stack.enter_context(chromium(width=960, height=1000))
        except BrowserMissing as exc:
            if not args.smoke:
                raise SystemExit(str(exc)) from None
            driver = None
            print(f"--smoke without a browser ({exc}): the export and the Python side only")
        browser = browser_version(driver) if driver else None
        print(f"browser: {browser} (headless, wasm backend, {threads} threads); images: {len(images)}")
        for i, variant in enumerate(args.variants):
            folder = args.out / variant
            if not (folder / "vlmkit-onnx.json").is_file():
                start = time.perf_counter()
                export_model(args.model, folder, format="web", quantize=variant)
                print(f"{variant}: exported in {time.perf_counter() - start:.0f} s")
            manifest = read_onnx_manifest(folder)
            load = os.getloadavg()[0]
            python = python_captions(folder, images, threads=threads)
            python.pop("captioner")
            figures = {
                "payload_mb": round(manifest["web"]["payload_bytes"] / 1e6, 1),
                "python_ms": [round(m) for m in python["ms"]],
                "tokens": [len(ids) for ids in python["ids"]],
                "browser": browser,
                "threads": threads,
            }
            line = (
                f"{variant}: payload {figures['payload_mb']} MB; ms per caption: Python ONNX Runtime "
                f"{summary(python['ms'])}; {statistics.mean(figures['tokens']):.1f} tokens a caption"
            )
            if driver is not None:
                urls = [f"{base}/images/{n}.png" for n, _ in pictures]
                page = caption_in_page(driver, f"{base}/{variant}/index.html", urls)
                got = page["captions"]
                same = sum(g["ids"] == w for g, w in zip(got, python["ids"], strict=True))
                browser_ms = [g["ms"] for g in got]
                figures |= {
                    "page_load_s": round(page["load_s"], 1),
                    "browser_ms": [round(m) for m in browser_ms],
                    "browser_vision_ms": [round(g["visionMs"]) for g in got],
                    "browser_preprocess_ms": [round(g["preprocessMs"]) for g in got],
                    "identical_ids": same,
                    "captions": {n: g["text"] for (n, _), g in zip(pictures, got, strict=True)},
                }
                line += (
                    f"; page loaded in {figures['page_load_s']} s, Chromium {summary(browser_ms)} "
                    f"(first {browser_ms[0]:,.0f}); in the page, preprocessing "
                    f"{summary(figures['browser_preprocess_ms'])} and vision graph "
                    f"{summary(figures['browser_vision_ms'])}; token ids identical {same}/{len(got)}"
                )
            figures["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
            report.row(variant, **figures)
            print(
                f"{line}; load average {figures['load_average'][0]} -> {figures['load_average'][1]}",
                flush=True,
            )
            captions = figures.get("captions") or {}
            for (name, _), want in zip(pictures, python["text"], strict=True):
                got_text = captions.get(name, want)
                print(f"  {name:10s} {got_text!r}" + ("" if got_text == want else f" (Python: {want!r})"))
            if i == 0 and args.screenshot and driver is not None:
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(args.screenshot))
                crop_blank_bottom(args.screenshot)
                print(f"screenshot: {args.screenshot}")
    return report.finish(args.variants)


if __name__ == "__main__":
    sys.exit(main())
