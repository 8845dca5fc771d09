"""``--format web``: a static folder that captions images inside a web browser, on the user's machine.

The folder is an ONNX export (``vlmkit.runtime.onnx`` reads it: same manifest, graphs and
tokenizer, one variant) plus what a browser needs::

    vlmkit-onnx.json        the ONNX manifest, with a ``web`` section: the embedding table's raw
                            layout, the vendored libraries, the payload in bytes
    vision.<v>.onnx, decoder.<v>.onnx   the graphs of the chosen variant (fp32, int8 or int4)
    embed_tokens.npy        the token-embedding table, float32 or float16; a .npy (a 128-byte
                            header, then raw little-endian data) so that Python reads it as
                            it is and the browser slices the raw data at ``web.embed_tokens.offset``
    tokenizer.json, tokenizer_config.json
    vlmkit-web.js           the ES module: ``caption(imageOrBlob) -> Promise<string>``
    index.html              a demo page: choose or drop images, see captions and ms per caption
    vendor/                 onnxruntime-web and tokenizers.js, copied from their npm packages

Serve it with any static file server, e.g. ``python -m http.server -d DIR``. ONNX Runtime uses
several wasm threads only on a cross-origin-isolated page (headers
``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``);
without them it runs on one thread.

The browser reproduces ``OnnxCaptioner(DIR)`` token for token on the wasm backend
(``tests/export/test_web.py`` checks it in Chromium), including the image preprocessing: the JS
resamples with Pillow's or torchvision's integer kernels as the manifest declares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.core.errors import ArtifactError, ConfigError
from vlmkit.runtime import onnx as onnx_runtime

#: where the JS module, the page and the vendored libraries live in the package
WEB_DIR = Path(__file__).resolve().parent.parent / "runtime" / "web"
MODULE = "vlmkit-web.js"
PAGE = "index.html"
VARIANTS = ("fp32", "int8", "int4")
EMBEDDING_DTYPES = ("float32", "float16")


@dataclass
class WebExportResult:
    """What a web export wrote: the folder, its files (name -> bytes), the bytes a browser downloads
    to caption (graphs, embeddings, tokenizer, runtime) and the seconds it took."""

    path: Path
    files: dict[str, int] = field(default_factory=dict)
    payload_bytes: int = 0
    seconds: float = 0.0


def write_web_export(
    source,
    out: str | Path,
    *,
    variant: str = "int4",
    embeddings: str = "float16",
    overwrite: bool = False,
    registry=None,
    on_step: Callable[[str], None] | None = None,
) -> WebExportResult:
    """Write the web folder ``out`` from ``source``: an ONNX export folder (left as it is), a trained
    model folder, or an in-memory ``PrefixConditioningVLM`` (both exported to ONNX first).

    ``variant``: the graphs the page runs (``fp32``, or ``int8``/``int4`` weights quantized by
    ONNX Runtime's ``MatMulNBitsQuantizer``, see ``vlmkit.export.quantize``). ``embeddings``: the
    token-embedding table's storage, ``float16`` (half the bytes; the captions of the demo model
    are unchanged) or ``float32``.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown web variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if embeddings not in EMBEDDING_DTYPES:
        raise ConfigError(
            f"unknown embedding dtype {embeddings!r}; choose one of {', '.join(EMBEDDING_DTYPES)}"
        )
    out = Path(out)
    _check_out(out, overwrite)
    vendor = _vendor_files()  # fail before the slow part when the package lacks its JS
    start = time.perf_counter()
    with _staging(out, overwrite) as tmp:
        onnx_folder = _onnx_export(source, tmp / ".onnx", registry=registry, on_step=on_step)
        _assemble(onnx_folder, tmp, variant=variant, embeddings=embeddings, vendor=vendor, on_step=on_step)
        shutil.rmtree(tmp / ".onnx", ignore_errors=True)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    payload = read_web_manifest(out)["web"]["payload_bytes"]
    return WebExportResult(out, files, payload, time.perf_counter() - start)


def read_web_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a web export (an ONNX manifest with a ``web`` section); ``ArtifactError`` otherwise."""
    manifest = onnx_runtime.read_onnx_manifest(folder)
    if "web" not in manifest:
        raise ArtifactError(
            f"{folder} is an ONNX export without the browser runtime; write one with 'vlmkit export --format web'"
        )
    return manifest


# ------------------------------------------------------------------------------ assembling


def _onnx_export(source, folder: Path, *, registry, on_step) -> Path:
    """``source`` as an ONNX export folder: itself when it is one, else exported into ``folder``."""
    if isinstance(source, str | Path):
        path = Path(source)
        if (path / onnx_runtime.MANIFEST).is_file():
            onnx_runtime.read_onnx_manifest(path)  # a one-line error when it is not one we read
            return path
        from vlmkit.core.export import export_model  # the lead moves this to vlmkit.export

        return export_model(path, folder, format="onnx", registry=registry, on_step=on_step).path
    from vlmkit.core.export import export_vlm

    return export_vlm(source, folder, format="onnx", on_step=on_step).path


def _assemble(onnx_folder: Path, web: Path, *, variant, embeddings, vendor, on_step) -> None:
    from vlmkit.export.quantize import quantize_graph

    manifest = onnx_runtime.read_onnx_manifest(onnx_folder)
    fp32 = manifest["variants"]["fp32"]
    graphs = {}
    for part in ("vision", "decoder"):
        if variant == "fp32":
            graphs[part] = fp32[part]
            shutil.copy2(onnx_folder / fp32[part], web / graphs[part])
        else:
            _step(on_step, f"quantizing the {part} graph to {variant} (onnxruntime MatMulNBits)")
            graphs[part] = f"{part}.{variant}.onnx"
            quantize_graph(onnx_folder / fp32[part], web / graphs[part], variant)
    entry: dict[str, Any] = dict(graphs)
    if variant != "fp32":
        from vlmkit.export.quantize import DEFAULT_BLOCK_SIZE, WEIGHT_BITS

        entry.update(
            method="onnxruntime MatMulNBitsQuantizer",
            bits=WEIGHT_BITS[variant],
            block_size=DEFAULT_BLOCK_SIZE[variant],
        )

    _step(on_step, f"writing the token-embedding table ({embeddings})")
    table = np.load(onnx_folder / manifest["embed_tokens"], mmap_mode="r")
    np.save(web / "embed_tokens.npy", np.ascontiguousarray(table, dtype=embeddings))
    offset = _npy_data_offset(web / "embed_tokens.npy")

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (onnx_folder / name).is_file():
            shutil.copy2(onnx_folder / name, web / name)

    _step(on_step, "copying the browser runtime (vlmkit-web.js, index.html, vendor/)")
    shutil.copy2(WEB_DIR / MODULE, web / MODULE)
    shutil.copy2(WEB_DIR / PAGE, web / PAGE)
    (web / "vendor").mkdir()
    for name in vendor:
        shutil.copy2(WEB_DIR / "vendor" / name, web / "vendor" / name)

    preprocessing = dict(manifest["preprocessing"])
    resize = preprocessing.get("resize")
    if resize and resize.get("backend", "pil") == "pil":
        preprocessing["resize"] = {**resize, "pass_order": pillow_pass_order()}
    runtime_files = ["vendor/ort.min.mjs", "vendor/ort-wasm-simd-threaded.jsep.mjs"]
    runtime_files += ["vendor/ort-wasm-simd-threaded.jsep.wasm", "vendor/tokenizers.min.mjs", MODULE]
    loaded = [graphs["vision"], graphs["decoder"], "embed_tokens.npy", "tokenizer.json", *runtime_files]
    if (web / "tokenizer_config.json").is_file():
        loaded.append("tokenizer_config.json")
    versions = json.loads((WEB_DIR / "vendor" / "vendor.json").read_text())["packages"]
    manifest.update(
        variants={variant: entry},
        default_variant=variant,
        embed_tokens="embed_tokens.npy",
        preprocessing=preprocessing,
        web={
            "embed_tokens": {
                "file": "embed_tokens.npy",
                "dtype": embeddings,
                "shape": [int(s) for s in table.shape],
                "offset": offset,  # bytes of .npy header before the raw little-endian rows
            },
            "tokenizer": {
                "file": "tokenizer.json",
                "config": "tokenizer_config.json" if (web / "tokenizer_config.json").is_file() else None,
            },
            "runtime": {
                "onnxruntime": "vendor/ort.min.mjs",
                "tokenizers": "vendor/tokenizers.min.mjs",
                "vendor": "vendor/",
                "packages": {name: p["version"] for name, p in versions.items()},
            },
            "payload_bytes": sum((web / name).stat().st_size for name in loaded),
        },
    )
    (web / onnx_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _npy_data_offset(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").offset)  # a memmap starts where the header ends


def pillow_pass_order() -> str:
    """Which pass Pillow's resize runs first: ``pillow13`` (the vertical one when the height shrinks
    by more than twice as many pixels as the width, Pillow >= 13) or ``horizontal_first`` (older).

    Read off Pillow itself: one resize against the two single-axis resizes in each order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (41, 30, 3), dtype=np.uint8))
    size = (29, 11)  # width shrinks by 1, height by 30: vertical first in Pillow 13
    whole = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    vertical = np.asarray(
        image.resize((30, 11), Image.Resampling.BILINEAR).resize(size, Image.Resampling.BILINEAR)
    )
    return "pillow13" if np.array_equal(whole, vertical) else "horizontal_first"


def _vendor_files() -> list[str]:
    """The vendored files, checked against ``vendor/vendor.json`` (sizes and SHA-256)."""
    folder = WEB_DIR / "vendor"
    index = folder / "vendor.json"
    if not index.is_file() or not (WEB_DIR / MODULE).is_file():
        raise ArtifactError(
            f"this vlmkit installation lacks its browser runtime ({WEB_DIR}); reinstall vlmkit"
        )
    names = []
    for name, meta in json.loads(index.read_text())["files"].items():
        file = folder / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != meta["sha256"]:
            raise ArtifactError(f"{file} is missing or not the file vendor.json records; reinstall vlmkit")
        names.append(name)
    return names


def _step(on_step: Callable[[str], None] | None, message: str) -> None:
    if on_step is not None:
        on_step(message)


# ------------------------------------------------------------------------------ output folder


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; choose another --out")
    if not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not (out / onnx_runtime.MANIFEST).is_file():
        raise ArtifactError(f"{out} is not a vlmkit export; refusing to replace it (choose another --out)")


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds (as the ONNX
    export does: an interrupted export never leaves a folder that looks complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            _check_out(out, overwrite)
            old = out.parent / f".{out.name}.replaced-{tag}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
