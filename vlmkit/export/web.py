"""``vlmkit export --format web``: a static folder that captions images inside a web browser, on the
user's machine (no image leaves it).

The folder is an ONNX export of one variant plus what a browser needs::

    vlmkit-onnx.json        the ONNX manifest, with a ``web`` section: every file the page fetches
                            (``files``: stored path, bytes, SHA-256, gzip or not), the runtime's
                            files, the payload in bytes, and ``decoder`` or ``embed_tokens``
    vision.onnx             the vision graph (onnxruntime-web); with the page's own decoder, its
                            weights stored in float16 and cast back as the session loads
    decoder.bin.gz          int8 (default) on a Llama-block LM: the page's own decoder
                            (``vlmkit.export.web_decoder``, ``vlmkit.runtime.web_decoder``), run by
                            ``vlmkit-gemv.wasm``; the token embeddings are in it
    decoder.<v>.onnx, embed_tokens.npy   otherwise (another LM, ``--quantize int4|none``): the
                            onnxruntime-web decoder graph and the token-embedding table (float16 or
                            float32 .npy, the browser slices its raw rows at ``web.embed_tokens.offset``)
    tokenizer.json(.gz), tokenizer_config.json
    vlmkit-web.js           the ES module: ``caption(imageOrBlob) -> Promise<string>``
    index.html              a demo page: a progress bar while it loads, then choose or drop images
    vendor/                 onnxruntime-web (its wasm binary gzipped) and tokenizers.js, copied from
                            their npm packages

The page fetches the files at once and keeps each in the Cache API under its SHA-256, so a second
visit loads from disk and a re-export is fetched anew. Serve the folder with any static file
server, e.g. ``python -m http.server -d DIR``. ONNX Runtime uses several wasm threads only on a
cross-origin-isolated page (headers ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp``); without them it runs on one thread.

The browser reproduces its Python twin over the same folder (``vlmkit.testing.browser.python_captions``:
``WebCaptioner`` for the page's decoder, ``OnnxCaptioner`` for graphs), token for token on the
wasm backend (``tests/export/test_web.py`` checks it in Chromium), including the image
preprocessing: the JS resamples with Pillow's or torchvision's integer kernels as the manifest
declares.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.core.errors import ArtifactError
from vlmkit.export.steps import step
from vlmkit.runtime import onnx as onnx_runtime

#: where the JS module, the page and the vendored libraries live in the package
WEB_DIR = Path(__file__).resolve().parent.parent / "runtime" / "web"
MODULE = "vlmkit-web.js"
PAGE = "index.html"
#: what ONNX Runtime needs in the page: its ES module, the JSEP loader and its wasm binary
ORT_FILES = ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
TOKENIZERS_FILE = "tokenizers.min.mjs"
#: onnxruntime's wasm binary, which the export stores gzipped
ORT_WASM = f"vendor/{ORT_FILES[2]}"
#: the web decoder's matrix-vector kernel (vlmkit-gemv.wat, assembled)
GEMV = "vlmkit-gemv.wasm"
#: the same kernel over a shared memory, and the worker that runs it beside the page's thread
GEMV_SHARED = "vlmkit-gemv-shared.wasm"
GEMV_WORKER = "vlmkit-gemv-worker.js"


def write_web(
    vlm, folder: Path, *, opset: int, quantize: str | None, embeddings: str, source, on_step
) -> dict[str, Any]:
    """Write the web export of ``vlm`` into ``folder`` (staged by ``export_vlm``); returns the
    checks the ONNX export passed. ``quantize``: ``int4``/``int8`` weights, or None for fp32."""
    from vlmkit.export.onnx import write_onnx

    vendor = vendor_files()
    onnx_folder = folder / ".onnx"  # the fp32 ONNX export, the source of the graphs; removed below
    onnx_folder.mkdir()
    checks = write_onnx(vlm, onnx_folder, opset=opset, quantize=None, source=source, on_step=on_step)
    decoder = None
    if quantize == "int8":
        decoder = _web_decoder(vlm, onnx_folder, folder, checks, source, on_step)
    _assemble(
        onnx_folder,
        folder,
        variant=quantize,
        embeddings=embeddings,
        vendor=vendor,
        decoder=decoder,
        checks=checks,
        on_step=on_step,
    )
    shutil.rmtree(onnx_folder)
    return checks


def _web_decoder(
    vlm, onnx_folder: Path, folder: Path, checks: dict, source, on_step
) -> dict[str, Any] | None:
    """``decoder.bin`` and the manifest's ``web.decoder`` where the LM is a Llama-block decoder
    (``vlmkit.export.web_decoder``); None, said in one step line, where it is not (the page then
    runs the decoder graph in onnxruntime-web, 10x slower)."""
    from vlmkit.export import web_decoder
    from vlmkit.export.onnx import agreement_images, merged_decoder
    from vlmkit.export.quantize import AGREEMENT_THRESHOLD, QuantizationWarning

    lm = merged_decoder(vlm)
    why = web_decoder.unsupported(lm)
    if why is not None:
        step(
            on_step,
            f"the page runs the decoder graph in onnxruntime-web: its own decoder does not compute {why}",
        )
        return None
    images, where = calibration_images(source)
    step(on_step, f"calibrating the int8 rounding: the float model captions {len(images)} {where}")
    hessians = web_decoder.calibrate(vlm, lm, images)
    step(
        on_step,
        "packing the decoder for the page's own runtime (int8 weights in blocks of 32, error-compensated "
        "rounding, int16 activations)",
    )
    embed = np.load(onnx_folder / "embed_tokens.npy")
    spec = web_decoder.write_decoder(lm, embed, folder, hessians=hessians)
    spec["calibration"] = {"images": len(images), "source": where}
    step(on_step, "checking the packed decoder against PyTorch")
    manifest = {"web": {"decoder": spec}}
    checks["web_decoder_max_rel_diff"] = web_decoder.check_decoder(lm, folder, manifest)
    samples = agreement_images()
    step(on_step, f"captioning {len(samples)} sample images with the packed decoder and with PyTorch")
    entry = web_decoder.caption_agreement(vlm, folder, manifest, samples, threshold=AGREEMENT_THRESHOLD)
    checks["caption_agreement"] = entry
    if entry["identical"] < AGREEMENT_THRESHOLD * entry["images"]:
        warnings.warn(
            f"the page's int8 decoder captions only {entry['identical']} of {entry['images']} sample images "
            "as the float model does: its captions may not be the model's; --quantize none exports fp32 graphs",
            QuantizationWarning,
            stacklevel=2,
        )
    return spec


#: images the int8 rounding is calibrated on (the training split's first ones where it loads)
CALIBRATION_IMAGES = 128


def calibration_images(source: dict[str, Any] | None, n: int = CALIBRATION_IMAGES) -> tuple[list, str]:
    """(``n`` images to calibrate the web decoder's rounding on, what they are): the first of the
    training split of the datasets the model was trained on, as its manifest's training config
    names them; drawn shapes (``agreement_images``' kind, not the same ones) where the model has no
    training config, its data do not load here, or a dataset is not ``local`` (``DatasetSpec.local``:
    an export never downloads a training split)."""
    from vlmkit.export.onnx import agreement_images

    try:
        from vlmkit.core.artifact import read_manifest
        from vlmkit.core.config import DatasetConfig
        from vlmkit.core.registry import get_registry
        from vlmkit.sdk.datasets import load_split

        settings = read_manifest(source["model"])["training"]["config"]
        datasets = [DatasetConfig.model_validate(d) for d in settings["datasets"]]
        registry = get_registry()
        remote = sorted({d.name for d in datasets if not registry.dataset(d.name).local})
        if remote:
            raise LookupError(f"{', '.join(remote)} may need a download")
        train = load_split(datasets, "train", seed=settings.get("seed", 0))
        names = ", ".join(d.name for d in datasets)
        images = [train[i].load_image().convert("RGB") for i in range(min(n, len(train)))]
        return images, f"images of the training split ({names})"
    except Exception as exc:  # noqa: BLE001 - no source, no training config, data not here: draw
        from vlmkit.sdk.encoders import one_line

        drawn = agreement_images(len(agreement_images()) + n)[-n:]  # not the agreement check's
        return drawn, f"drawn shapes (not the training split: {one_line(exc, 120)})"


def read_web_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a web export (an ONNX manifest with a ``web`` section); ``ArtifactError`` otherwise."""
    manifest = onnx_runtime.read_onnx_manifest(folder)
    if "web" not in manifest:
        raise ArtifactError(
            f"{folder} is an ONNX export without the browser runtime; write one with 'vlmkit export --format web'"
        )
    return manifest


def _assemble(onnx_folder: Path, web: Path, *, variant, embeddings, vendor, decoder, checks, on_step) -> None:
    from vlmkit.export.quantize import quantize_graphs

    manifest = onnx_runtime.read_onnx_manifest(onnx_folder)
    fp32 = manifest["variants"]["fp32"]
    files: dict[str, dict[str, Any]] = {}  # what the page fetches (and caches), by name
    if decoder is not None:  # the vision graph in onnxruntime-web, the decoder in the page's runtime
        variant = "int8"
        step(on_step, "storing the vision graph's weights in float16 (cast to float32 as the page loads it)")
        _half_initializers(onnx_folder / fp32["vision"], web / fp32["vision"])
        entry = {"vision": fp32["vision"], "web_decoder": decoder["file"], "method": "vlmkit web decoder",
                 "bits": 8, "block_size": decoder["block"]}  # fmt: skip
        step(on_step, f"compressing {decoder['file']} (gzip; the page decompresses and caches it)")
        files[decoder["file"]] = _publish(web, decoder["file"], gzip=True)
        for name in (GEMV, GEMV_SHARED):
            shutil.copy2(WEB_DIR / name, web / name)
            files[name] = _publish(web, name)
        shutil.copy2(WEB_DIR / GEMV_WORKER, web / GEMV_WORKER)
    elif variant is None:
        variant, entry = "fp32", dict(fp32)
        for part in ("vision", "decoder"):
            shutil.copy2(onnx_folder / fp32[part], web / fp32[part])
    else:
        # accuracy_level unset: float activations, which the wasm kernels compute as ONNX Runtime's
        # CPU kernels do, so the browser's captions equal Python's (see vlmkit.export.quantize)
        entry = quantize_graphs(onnx_folder, fp32, variant, target=web, on_step=on_step)
    files[entry["vision"]] = _publish(web, entry["vision"])
    web_section: dict[str, Any] = {}
    if decoder is None:
        files[entry["decoder"]] = _publish(web, entry["decoder"])
        step(on_step, f"writing the token-embedding table ({embeddings})")
        table = np.load(onnx_folder / manifest["embed_tokens"], mmap_mode="r")
        np.save(web / "embed_tokens.npy", np.ascontiguousarray(table, dtype=embeddings))
        offset = int(np.load(web / "embed_tokens.npy", mmap_mode="r").offset)  # where the header ends
        files["embed_tokens.npy"] = _publish(web, "embed_tokens.npy")
        web_section["embed_tokens"] = {
            "file": "embed_tokens.npy",
            "dtype": embeddings,
            "shape": [int(s) for s in table.shape],
            "offset": offset,  # bytes of .npy header before the raw little-endian rows
        }
    else:
        web_section["decoder"] = decoder

    tokenizer_files = [n for n in ("tokenizer.json", "tokenizer_config.json") if (onnx_folder / n).is_file()]
    for name in tokenizer_files:
        shutil.copy2(onnx_folder / name, web / name)
        files[name] = _publish(web, name, gzip=name == "tokenizer.json", keep=True)

    step(on_step, "copying the browser runtime (vlmkit-web.js, index.html, vendor/)")
    shutil.copy2(WEB_DIR / MODULE, web / MODULE)
    shutil.copy2(WEB_DIR / PAGE, web / PAGE)
    (web / "vendor").mkdir()
    for name in vendor:
        shutil.copy2(WEB_DIR / "vendor" / name, web / "vendor" / name)
    # onnxruntime's 28 MB binary travels gzipped (6.7 MB): the page decompresses it and hands it over
    files[ORT_WASM] = _publish(web, ORT_WASM, gzip=True)

    preprocessing = dict(manifest["preprocessing"])
    resize = preprocessing.get("resize")
    if resize and resize.get("backend", "pil") == "pil":
        preprocessing["resize"] = {**resize, "pass_order": pillow_pass_order()}
    modules = [f"vendor/{n}" for n in (*ORT_FILES, TOKENIZERS_FILE) if n != ORT_WASM.removeprefix("vendor/")]
    modules.append(MODULE)
    if decoder is not None:
        modules.append(GEMV_WORKER)
    versions = json.loads((WEB_DIR / "vendor" / "vendor.json").read_text())["packages"]
    payload = sum(f["bytes"] for f in files.values()) + sum((web / m).stat().st_size for m in modules)
    manifest.update(
        variants={variant: entry},
        default_variant=variant,
        embed_tokens="embed_tokens.npy" if decoder is None else None,
        preprocessing=preprocessing,
        checks=checks,  # the ONNX export's and the web decoder's
        web={
            **web_section,
            "tokenizer": {
                "file": "tokenizer.json",
                "config": "tokenizer_config.json" if "tokenizer_config.json" in tokenizer_files else None,
            },
            "runtime": {
                "onnxruntime": f"vendor/{ORT_FILES[0]}",
                "wasm_binary": ORT_WASM,
                "tokenizers": f"vendor/{TOKENIZERS_FILE}",
                "gemv": GEMV if decoder is not None else None,
                "gemv_shared": GEMV_SHARED if decoder is not None else None,
                "gemv_worker": GEMV_WORKER if decoder is not None else None,
                "vendor": "vendor/",
                "packages": {name: p["version"] for name, p in versions.items()},
            },
            "files": files,
            "modules": {m: (web / m).stat().st_size for m in modules},
            "payload_bytes": payload,
        },
    )
    (web / onnx_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _half_initializers(source: Path, target: Path, min_elements: int = 1024) -> None:
    """``source`` with every float32 initializer of ``min_elements`` or more stored as float16 and
    cast back by a ``Cast`` node (ONNX Runtime folds it when the session is created): half the
    download, float32 arithmetic, the weights rounded to float16 (the export's checks and the
    Python runtime run this same graph)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    casts, kept = [], []
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and np.prod(tensor.dims) >= min_elements:
            half = numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}.float16"
            )
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [tensor.name], to=onnx.TensorProto.FLOAT))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _publish(web: Path, name: str, *, gzip: bool = False, keep: bool = False) -> dict[str, Any]:
    """The entry of ``web/name`` in the manifest's ``web.files``: the stored file's path, bytes and
    SHA-256 (the page's cache key). ``gzip``: stored as ``name.gz`` (level 6), the original removed
    unless ``keep`` (for the Python runtime); the page decompresses it (``DecompressionStream``) and
    caches the result."""
    import gzip as gz

    source = web / name
    path = source
    if gzip:
        path = source.with_name(source.name + ".gz")
        with (
            open(source, "rb") as raw,
            open(path, "wb") as out,
            gz.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as z,
        ):
            shutil.copyfileobj(raw, z, 1 << 22)
        if not keep:
            source.unlink()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    entry = {"path": str(path.relative_to(web)), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return {**entry, "encoding": "gzip"} if gzip else entry


def read_file(folder: str | Path, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of the web export's file ``name`` as the page gets them (decompressed)."""
    import gzip as gz

    meta = manifest["web"]["files"][name]
    data = (Path(folder) / meta["path"]).read_bytes()
    return gz.decompress(data) if meta.get("encoding") == "gzip" else data


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


@functools.cache  # hashing 29 MB once per process is enough
def vendor_files() -> list[str]:
    """The vendored files, checked against ``vendor/vendor.json`` (sizes and SHA-256); called before
    the slow part of an export so that an installation without them fails at once."""
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
