"""Captions of quantized ONNX graphs and embedding tables against float32, and their sizes.

    python benchmarks/web_quantization.py ONNX_DIR [--images 24] [--max-new-tokens N]

ONNX_DIR is a ``vlmkit export --format onnx`` folder of a model trained on ``shapes`` (the demo
model: ``vlmkit export -m runs/demo -o runs/demo-onnx``). The script adds the ``int8`` and ``int4``
variants as the web export writes them (ONNX Runtime's ``MatMulNBitsQuantizer``, float
activations, see ``vlmkit.export.quantize``) and ``int8-acc4`` (int8 activations too: what
``--format onnx --quantize int8`` writes) when missing, captions held-out ``shapes`` images and
scikit-image's photos with each, and prints per variant: captions identical to fp32, ms per
caption (Python ONNX Runtime, this machine) and bytes; then the same for the token-embedding table
stored as float16 and as int8 (one scale per row), fed to the int4 graphs (the web export's
default). The bar (issue 18): at least 95% of captions identical to fp32's.

``--smoke``: exports a tiny random model (timm's test EfficientNet + a 2-layer Llama) to ONNX and
measures it on 1 test image and the 3 photos, 4 new tokens: checks the script, its figures mean nothing. ``--json
PATH``: one JSON line per variant, then the embedding table's sizes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import harness
import numpy as np


def images(n: int):
    from PIL import Image

    from vlmkit.recipes.demo import SKIMAGE_PHOTOS, demo_config
    from vlmkit.sdk.datasets import load_split

    config = demo_config("runs/demo")
    test = load_split(config.datasets, "test", seed=config.seed)
    out = [test[i].load_image() for i in range(min(n, len(test)))]
    try:
        from skimage import data

        out += [Image.fromarray(np.asarray(getattr(data, k)())).convert("RGB") for k in SKIMAGE_PHOTOS]
    except ImportError:
        pass
    return out


def add_variant(folder: Path, name: str, variant: str, accuracy_level: int | None = None) -> None:
    """Quantize the fp32 graphs to ``variant`` in ``folder/name/`` and register them as ``name``."""
    from vlmkit.export.quantize import quantize_graphs

    file = folder / "vlmkit-onnx.json"
    manifest = json.loads(file.read_text())
    if name in manifest["variants"]:
        return
    (folder / name).mkdir(exist_ok=True)
    entry = quantize_graphs(
        folder, manifest["variants"]["fp32"], variant, target=folder / name, accuracy_level=accuracy_level
    )
    entry.update(vision=f"{name}/{entry['vision']}", decoder=f"{name}/{entry['decoder']}")
    manifest["variants"][name] = entry
    file.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv=None) -> int:
    parser = harness.parser(__doc__, threads=None)
    parser.add_argument("onnx", type=Path, nargs="?", help="a `vlmkit export --format onnx` folder")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if args.smoke == bool(args.onnx):
        parser.error("give ONNX_DIR, or --smoke (which exports a tiny model itself), not both")
    out = harness.start(args, "web_quantization")

    from vlmkit.runtime.onnx import OnnxCaptioner

    if args.smoke:
        from vlmkit.export import export_model

        work = harness.workdir("web-quantization")
        args.onnx, args.images, args.max_new_tokens = work / "onnx", 1, 4
        export_model(harness.tiny_model_folder(work), args.onnx)
    print(harness.describe_machine())
    add_variant(args.onnx, "int4", "int4")
    add_variant(args.onnx, "int8", "int8")
    add_variant(args.onnx, "int8-acc4", "int8", accuracy_level=4)
    pictures = images(args.images)
    manifest = json.loads((args.onnx / "vlmkit-onnx.json").read_text())
    table = np.load(args.onnx / manifest["embed_tokens"])
    stored = {
        "float16": table.astype(np.float16).astype(np.float32),
        "int8": np.rint(table / (scale := np.abs(table).max(1, keepdims=True) / 127)).clip(-127, 127) * scale,
    }
    runs = [(v, None) for v in ("fp32", "int8", "int8-acc4", "int4")]
    runs += [("int4", e) for e in stored]
    captions: dict[str, list[str]] = {}
    for variant, embedding in runs:
        captioner = OnnxCaptioner(args.onnx, variant=variant)
        if embedding:
            captioner.embed_tokens = stored[embedding].astype(np.float32)
        kwargs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        captioner.generate(pictures[:1], **kwargs)  # warm-up
        start = time.perf_counter()
        got = [captioner.generate([p], **kwargs)[0] for p in pictures]
        ms = (time.perf_counter() - start) * 1000 / len(pictures)
        name = variant + (f" + {embedding} embeddings" if embedding else "")
        captions[name] = got
        same = sum(a == b for a, b in zip(got, captions["fp32"], strict=True))
        files = (
            manifest["variants"].get(variant)
            or json.loads((args.onnx / "vlmkit-onnx.json").read_text())["variants"][variant]
        )
        mb = sum((args.onnx / files[p]).stat().st_size for p in ("vision", "decoder")) / 1e6
        print(
            f"{name:32s} identical to fp32 {same}/{len(got)} ({100 * same / len(got):.0f}%)  "
            f"{ms:6.0f} ms/caption  graphs {mb:6.1f} MB",
            flush=True,
        )
        out.row(name, identical=same, images=len(got), ms_per_caption=ms, graphs_mb=mb)
    rows, dim = table.shape
    sizes = {
        "float32": table.nbytes / 1e6,
        "float16": table.nbytes / 2e6,
        "int8_row_scales": rows * (dim + 4) / 1e6,
    }
    out.row("embedding table", rows=rows, dim=dim, mb=sizes)
    print(
        f"embedding table [{rows}, {dim}]: float32 {sizes['float32']:.1f} MB, float16 {sizes['float16']:.1f} MB, "
        f"int8 + row scales {sizes['int8_row_scales']:.1f} MB"
    )
    for name, got in captions.items():
        for i, (a, b) in enumerate(zip(captions["fp32"], got, strict=True)):
            if a != b:
                print(f"  {name}, image {i}: fp32 {a!r} -> {b!r}")
    return out.finish([*captions, "embedding table"])


if __name__ == "__main__":
    sys.exit(main())
