"""``--format web``: the browser captions as the Python ONNX runtime does, token for token, in a
real headless Chromium (Selenium with Debian's chromium and chromium-driver, through
``vlmkit.testing.browser``).

Two tiny random pairs of real architectures: the default pair's (timm encoder, Pillow bicubic
resize + centre crop; Llama decoder) and SigLIP (torchvision's antialiased resize) + Qwen2; and the
demo's model with real weights (EfficientNet-Lite0 + SmolLM2-135M, trained on five photos by the
session fixture ``real_weights_model``; marked ``slow``, a minute or two). Each test prints its
figures (payload, ms per caption in the page and in Python); ``VLMKIT_WEB_REPORT=file.json`` keeps
them. ``benchmarks/web_browser.py`` measures a fully trained demo model and takes the
screenshot in docs/browser.md.

Without Chromium the tests fail and say how to install it; ``VLMKIT_SKIP_BROWSER=1`` skips them.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest

from vlmkit.runtime.onnx import OnnxCaptioner, preprocess_images, read_onnx_manifest

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_torch_thread")]

#: name -> (encoder, image size, decoder plugin, tiny architecture, web variant): int8 on a Llama is
#: the page's own decoder (vlmkit.runtime.web_decoder), int4 the onnxruntime-web graphs
PAIRS = {
    "timm-llama": ("timm", 64, "smollm", "llama", "int8"),
    "siglip-qwen2": ("siglip", 32, "qwen2", "qwen2", "int4"),
}


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium through the system's chromedriver."""
    from vlmkit.testing.browser import BrowserMissing, chromium

    try:
        with chromium() as driver:
            yield driver
    except BrowserMissing as exc:
        if os.environ.get("VLMKIT_SKIP_BROWSER"):
            pytest.skip(f"{exc} (VLMKIT_SKIP_BROWSER is set)")
        pytest.fail(f"{exc} (or set VLMKIT_SKIP_BROWSER=1 to skip the browser tests)", pytrace=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``(root folder, base URL)``: a static server on 127.0.0.1 (a free port) over a temporary root."""
    from vlmkit.testing.browser import serve

    root = tmp_path_factory.mktemp("site")
    with serve(root) as base:
        yield root, base


@pytest.fixture(scope="module")
def images(site):
    """Three PNGs of different sizes (one larger than every encoder's input, one tall), served."""
    from PIL import Image, ImageDraw

    root, _ = site
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, colour) in enumerate(((48, 40, "red"), (97, 61, "blue"), (45, 130, "green"))):
        pixels = (rng.integers(0, 256, (h, w, 3)) * 0.3 + 160).astype(np.uint8)
        image = Image.fromarray(pixels)
        ImageDraw.Draw(image).ellipse((4, 4, w // 2 + 4, h // 2 + 4), fill=colour)
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return paths


def _tiny_model(root: Path, encoder, size, decoder, arch) -> Path:
    import torch

    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint
    from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

    config = {
        "encoder": encoder,
        "encoder_checkpoint": tiny_encoder_checkpoint(encoder, root / "encoder", image_size=size),
        "decoder": decoder,
        "decoder_checkpoint": tiny_decoder_checkpoint(arch, root / "decoder"),
        "projection": {"reduction": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "prompt": "Describe the image.",
        "max_caption_tokens": 12,
    }
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator: one model every run
    vlm = PrefixConditioningVLM.build(config)
    # a LoRA of weight so that tiny random LMs say varied tokens, not one repeated
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in vlm.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=generator)
    return vlm.eval().save(root / "model")


def _figures(variant, payload_bytes, got, python) -> dict:
    return {
        "variant": variant,
        "payload_mb": round(payload_bytes / 1e6, 2),
        "browser_ms": [round(g["ms"], 1) for g in got],
        "browser_ms_median_after_first": round(statistics.median(g["ms"] for g in got[1:]), 1),
        "python_ms": [round(ms, 1) for ms in python["ms"]],
        "tokens": [len(ids) for ids in python["ids"]],
        "captions": python["text"],
    }


def _report(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    if os.environ.get("VLMKIT_WEB_REPORT"):
        report = Path(os.environ["VLMKIT_WEB_REPORT"])
        data = json.loads(report.read_text()) if report.is_file() else {}
        report.write_text(json.dumps({**data, name: figures}, indent=2) + "\n")


def _same_pixels(browser, url: str, image, manifest) -> None:
    """The page's preprocessing of ``url`` equals the Python runtime's, bit for bit (a wrong pixel
    would show here before it flips a token)."""
    pixels = browser.execute_async_script(
        "const done = arguments[1]; window.vlmkitPage.preprocessUrl(arguments[0]).then(done);", url
    )
    expected = preprocess_images([image], manifest["preprocessing"])[0]
    np.testing.assert_array_equal(np.asarray(pixels, dtype=np.float32), expected.ravel())


@pytest.fixture(scope="module")
def tiny_exports(site, tmp_path_factory):
    """name -> ``ExportResult``: each tiny pair's web export, served under ``/<name>/``."""
    from vlmkit.export import export_model

    root, _ = site
    out = {}
    for name, (encoder, size, decoder, arch, variant) in PAIRS.items():
        model = _tiny_model(tmp_path_factory.mktemp(name), encoder, size, decoder, arch)
        out[name] = export_model(model, root / name, format="web", quantize=variant)
    return out


@pytest.mark.parametrize("name", list(PAIRS))
def test_browser_captions_equal_the_python_runtime(name, browser, site, images, tiny_exports, tmp_path):
    from PIL import Image

    from vlmkit.testing.browser import caption_in_page, python_captions

    root, base = site
    variant, result = PAIRS[name][-1], tiny_exports[name]
    assert (root / name / "index.html").is_file() and result.payload_bytes > 0
    manifest = read_onnx_manifest(root / name)
    assert list(manifest["variants"]) == [variant]
    assert ("decoder" in manifest["web"]) == (variant == "int8"), (
        "the page's own decoder is int8 on a Llama only"
    )
    assert not any(f.startswith(".") for f in result.files), "the staging ONNX export is left"

    # what the browser must reproduce: the Python ONNX runtime over the same folder
    pil_images = [Image.open(p).convert("RGB") for p in images]
    python = python_captions(root / name, pil_images)
    assert any(python["ids"]), "every caption is empty: the comparison would prove little"

    urls = [f"{base}/images/{p.name}" for p in images]
    page = caption_in_page(browser, f"{base}/{name}/index.html", urls)
    got = page["captions"]
    assert [g["ids"] for g in got] == python["ids"]
    assert [g["text"] for g in got] == python["text"]
    if "decoder" in manifest["web"] and (os.cpu_count() or 1) > 1:
        # the page's decoder shares each product's rows with workers, which computed some of
        # them, and the one-thread page (?threads=1) captions the same: which thread computes a
        # row does not change it
        assert f"wasm kernel ({min(4, os.cpu_count())} threads)" in page["status"], page["status"]
        info = browser.execute_async_script(
            "const done = arguments[0]; window.vlmkitPage.loadInfo().then(done, (e) => done({error: String(e)}));"
        )
        assert info["decoderWorkerChunks"] > 0, info
        alone = caption_in_page(browser, f"{base}/{name}/index.html?threads=1", urls)
        assert "wasm kernel (1 thread)" in alone["status"], alone["status"]
        assert [g["ids"] for g in alone["captions"]] == python["ids"]
        # the same image twice: the second prompt shares every position but the last with the
        # first, whose keys and values it reuses
        again = caption_in_page(browser, f"{base}/{name}/index.html", [urls[0], urls[0]])["captions"]
        assert [g["ids"] for g in again] == [python["ids"][0]] * 2

    # the module's one-call API, as another page or an extension would use it
    text = browser.execute_async_script(
        "const [url, done] = arguments; import(new URL('vlmkit-web.js', location.href).href)"
        ".then(async (m) => done(await m.caption(await (await fetch(url)).blob())), (e) => done(String(e)));",
        urls[0],
    )
    assert text == python["text"][0]
    _same_pixels(browser, urls[1], pil_images[1], python["captioner"].manifest)

    if "decoder" in manifest["web"]:  # the page's decoder computes what WebDecoder computes
        assert manifest["web"]["decoder"]["rounding"] == "error-compensated"
        # no training config in the tiny model: drawn shapes
        assert manifest["web"]["decoder"]["calibration"]["source"].startswith("drawn shapes")
        agreement = manifest["checks"]["caption_agreement"]
        assert agreement["vs"] == "fp32 PyTorch" and agreement["images"] == 12
        logits = browser.execute_async_script(
            "const done = arguments[1]; window.vlmkitPage.logitsUrl(arguments[0]).then(done, (e) => done(String(e)));",
            urls[2],
        )
        captioner = python["captioner"]
        embeds = captioner.prompt(captioner.image_prefix(captioner.preprocess(pil_images[2:]))[0])
        cache = captioner.decoder.new_cache()
        want = [captioner.decoder.step(x, t, cache) for t, x in enumerate(embeds)][-1]
        np.testing.assert_allclose(
            np.asarray(logits, dtype=np.float32), want, rtol=0, atol=1e-4 * np.abs(want).max()
        )

    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _report(name, _figures(variant, result.payload_bytes, got, python))


def test_a_second_visit_loads_from_the_cache_and_a_new_export_is_fetched(browser, site, tiny_exports):
    """The page keeps every file in the Cache API under its SHA-256: loaded again, it fetches
    nothing; a file whose hash the manifest changes is fetched anew (never a stale copy)."""
    import json

    root, base = site
    name = "timm-llama"
    info = "const done = arguments[0]; window.vlmkitPage.ready.then(() => window.vlmkitPage.loadInfo()).then(done, (e) => done({error: String(e)}));"
    browser.get(f"{base}/{name}/index.html")
    browser.execute_async_script(info)  # the first visit of this test's order may already have cached it
    browser.get(f"{base}/{name}/index.html")
    second = browser.execute_async_script(info)
    manifest_file = root / name / "vlmkit-onnx.json"
    web = json.loads(manifest_file.read_text())["web"]
    # the decoder's kernel over a shared memory where it has workers, the plain one where it has not
    unused = web["runtime"]["gemv" if second["decoderThreads"] > 1 else "gemv_shared"]
    assert second["fetched"] == 0 and sorted(second["fromCache"]) == sorted(set(web["files"]) - {unused}), (
        second
    )
    original = manifest_file.read_text()
    changed = json.loads(original)
    changed["web"]["files"]["tokenizer_config.json"]["sha256"] = "0" * 64  # as if re-exported
    manifest_file.write_text(json.dumps(changed))
    try:
        browser.get(f"{base}/{name}/index.html")
        third = browser.execute_async_script(info)
    finally:
        manifest_file.write_text(original)
    assert "tokenizer_config.json" not in third["fromCache"] and third["fetched"] > 0, third


def test_a_decoder_worker_that_cannot_start_leaves_the_page_on_one_thread(
    browser, site, images, tiny_exports
):
    """A worker script that is not there: the page says so in the console and captions on one
    thread, the same captions; never a page that does not load."""
    import json

    from PIL import Image

    from vlmkit.testing.browser import caption_in_page, python_captions

    root, base = site
    name = "timm-llama"
    python = python_captions(root / name, [Image.open(p).convert("RGB") for p in images[:2]])
    urls = [f"{base}/images/{p.name}" for p in images[:2]]
    manifest_file = root / name / "vlmkit-onnx.json"
    original = manifest_file.read_text()
    changed = json.loads(original)
    changed["web"]["runtime"]["gemv_worker"] = "no-such-worker.js"  # the manifest is never cached
    manifest_file.write_text(json.dumps(changed))
    try:
        browser.get_log("browser")  # earlier tests' lines
        page = caption_in_page(browser, f"{base}/{name}/index.html?threads=2", urls)
        log = [entry["message"] for entry in browser.get_log("browser")]
    finally:
        manifest_file.write_text(original)
    assert "wasm kernel (1 thread)" in page["status"], page["status"]
    assert [g["ids"] for g in page["captions"]] == python["ids"]
    assert any("the decoder runs on one thread" in line and "no-such-worker.js" in line for line in log), log


def test_webgpu_backend_runs_where_the_browser_has_an_adapter(site, images, tiny_exports):
    """``backend: "auto"`` picks WebGPU when the browser has an adapter. Here the adapter is
    SwiftShader (Chromium's software Vulkan: WebGPU's code path, not a GPU's speed or numerics):
    the page loads on WebGPU, its vision graph gives the Python runtime's image prefix to float
    tolerance, and it captions an image. Token ids are not compared: WebGPU's kernels sum in
    another order, and this tiny random LM's near-tied tokens then flip (they do here)."""
    from PIL import Image

    from vlmkit.testing.browser import BrowserMissing, caption_in_page, chromium

    root, base = site
    name = "siglip-qwen2"  # int4 MatMulNBits in both graphs
    python = OnnxCaptioner(root / name, threads=1)
    image = Image.open(images[1]).convert("RGB")
    want = python.image_prefix(python.preprocess([image]))[0]
    urls = [f"{base}/images/{p.name}" for p in images]
    try:
        with chromium(webgpu=True) as driver:
            page = caption_in_page(driver, f"{base}/{name}/index.html", urls[:1])  # SwiftShader is slow
            prefix = driver.execute_async_script(
                "const done = arguments[1]; window.vlmkitPage.prefixUrl(arguments[0]).then(done);", urls[1]
            )
    except BrowserMissing as exc:
        if os.environ.get("VLMKIT_SKIP_BROWSER"):
            pytest.skip(f"{exc} (VLMKIT_SKIP_BROWSER is set)")
        raise
    assert "; webgpu;" in page["status"], page["status"]
    np.testing.assert_allclose(np.asarray(prefix, dtype=np.float32), want.ravel(), rtol=1e-3, atol=1e-4)
    limit = python.manifest["generation"]["max_new_tokens"]
    assert all(0 < len(g["ids"]) <= limit and g["text"] for g in page["captions"]), page["captions"]


#: the demo model's test images: three of the photos it was trained on (a tall, a wide, a square one)
DEMO_PHOTOS = ("coffee", "chelsea", "astronaut")


@pytest.mark.slow
def test_browser_captions_the_demo_model(real_weights_model, browser, site):
    """The demo's model with real weights (EfficientNet-Lite0 + SmolLM2-135M, trained on five
    photos by the session fixture ``real_weights_model``), exported as the web export's default
    (the page's own int8 decoder): the page says what its Python twin (``WebCaptioner``) says,
    token for token, and what the trained model learnt to say. Two to five minutes on 2 busy cores."""
    import torch
    from PIL import Image

    from vlmkit.export import export_model
    from vlmkit.testing.browser import caption_in_page, python_captions

    root, base = site
    threads = torch.get_num_threads()  # the module runs tiny models on one thread; SmolLM2 uses all
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        result = export_model(real_weights_model["path"], root / "demo", format="web")
    finally:
        torch.set_num_threads(threads)
    manifest = read_onnx_manifest(root / "demo")
    assert list(manifest["variants"]) == ["int8"] and "decoder" in manifest["web"], (
        "the web export's default changed: update docs/browser.md's figures"
    )
    index = [real_weights_model["names"].index(name) for name in DEMO_PHOTOS]
    (root / "photos").mkdir()
    for name, i in zip(DEMO_PHOTOS, index, strict=True):
        real_weights_model["images"][i].save(root / "photos" / f"{name}.png")
    pil_images = [Image.open(root / "photos" / f"{name}.png").convert("RGB") for name in DEMO_PHOTOS]
    python = python_captions(root / "demo", pil_images)
    urls = [f"{base}/photos/{name}.png" for name in DEMO_PHOTOS]
    page = caption_in_page(browser, f"{base}/demo/index.html", urls)
    got = page["captions"]
    assert [g["ids"] for g in got] == python["ids"]
    assert [g["text"] for g in got] == python["text"]
    # a trained model, not noise: the int8 decoder keeps what the PyTorch model says (all but one)
    torch_says = [real_weights_model["got"][i] for i in index]
    assert sum(g["text"] == t for g, t in zip(got, torch_says, strict=True)) >= len(got) - 1, (
        [g["text"] for g in got],
        torch_says,
    )
    _same_pixels(browser, urls[1], pil_images[1], python["captioner"].manifest)
    _report(
        "demo",
        {**_figures("int8", result.payload_bytes, got, python), "page_load_s": round(page["load_s"], 1)},
    )
