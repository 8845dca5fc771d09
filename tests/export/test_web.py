"""``--format web``: the browser captions as the Python ONNX runtime does, token for token, in a
real headless Chromium (Selenium with Debian's chromium and chromium-driver).

Two tiny random pairs of real architectures: the default pair's (timm encoder, Pillow bicubic
resize + centre crop; Llama decoder) and SigLIP (torchvision's antialiased resize) + Qwen2. Set
``VLMKIT_WEB_MODEL=runs/demo`` to run the trained demo model too (minutes: it exports
SmolLM2-135M), ``VLMKIT_WEB_SCREENSHOT=docs/browser.png`` to keep a screenshot of the last page
and ``VLMKIT_WEB_REPORT=file.json`` to keep the figures (payload, ms per caption).

Without Chromium the test fails and says how to install it; ``VLMKIT_SKIP_BROWSER=1`` skips it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from vlmkit.runtime.onnx import OnnxCaptioner, preprocess_images

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_torch_thread")]

INSTALL = (
    "apt-get install -y chromium chromium-driver && pip install -e '.[dev]' "
    "(or set VLMKIT_SKIP_BROWSER=1 to skip the browser tests)"
)
#: name -> (encoder, image size, decoder plugin, tiny architecture, web variant)
PAIRS = {
    "timm-llama": ("timm", 64, "smollm", "llama", "int8"),
    "siglip-qwen2": ("siglip", 32, "qwen2", "qwen2", "int4"),
}


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium through the system's chromedriver."""
    chromium = os.environ.get("VLMKIT_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if chromium is None or driver_path is None or webdriver is None:
        missing = "Chromium" if chromium is None else "chromedriver" if driver_path is None else "selenium"
        if os.environ.get("VLMKIT_SKIP_BROWSER"):
            pytest.skip(f"{missing} not found and VLMKIT_SKIP_BROWSER is set")
        pytest.fail(f"the browser tests need {missing}: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_window_size(960, 640)
    driver.set_script_timeout(900)  # a real model's first caption on a busy machine takes minutes
    driver.command_executor.client_config.timeout = 900
    yield driver
    driver.quit()


class _Handler(SimpleHTTPRequestHandler):
    # cross-origin isolation, so that onnxruntime-web may use wasm threads
    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``(root folder, base URL)``: a static server on 127.0.0.1 (a free port) over a temporary root."""
    root = tmp_path_factory.mktemp("site")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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


def _cases():
    cases = [pytest.param(name, id=name) for name in PAIRS]
    if os.environ.get("VLMKIT_WEB_MODEL"):
        cases.append(pytest.param("demo", id="demo", marks=pytest.mark.slow))
    return cases


def _caption_in_page(browser, url: str, images: list[str]) -> list[dict]:
    browser.get(url)
    ready = browser.execute_async_script(
        "const done = arguments[0]; window.vlmkitPage.ready.then(done, (e) => done(String(e)));"
    )
    assert ready is True, f"the page did not load the model: {ready}; console: {_console(browser)}"
    out = []
    for image in images:
        result = browser.execute_async_script(
            "const done = arguments[1]; window.vlmkitPage.captionUrl(arguments[0])"
            ".then(done, (e) => done({error: String(e)}));",
            image,
        )
        assert "error" not in result, f"{image}: {result['error']}; console: {_console(browser)}"
        out.append(result)
    return out


def _console(browser) -> list[str]:
    try:
        return [entry["message"] for entry in browser.get_log("browser")][-5:]
    except Exception:  # noqa: BLE001 - logs are a diagnostic only
        return []


@pytest.mark.parametrize("name", _cases())
def test_browser_captions_equal_the_python_runtime(name, browser, site, images, tmp_path_factory):
    from PIL import Image

    from vlmkit.export import export_model

    root, base = site
    work = tmp_path_factory.mktemp(name)
    if name == "demo":
        model, variant = Path(os.environ["VLMKIT_WEB_MODEL"]), os.environ.get("VLMKIT_WEB_VARIANT", "int8")
    else:
        encoder, size, decoder, arch, variant = PAIRS[name]
        model = _tiny_model(work, encoder, size, decoder, arch)
    result = export_model(model, root / name, format="web", quantize=variant)
    assert (root / name / "index.html").is_file() and result.payload_bytes > 0
    assert list(OnnxCaptioner(root / name, threads=1).manifest["variants"]) == [variant]
    assert not any(f.startswith(".") for f in result.files), "the staging ONNX export is left"

    # what the browser must reproduce: the Python ONNX runtime over the same folder
    python = OnnxCaptioner(root / name)
    pil_images = [Image.open(p).convert("RGB") for p in images]
    python.generate(pil_images[:1])  # warm-up, as the browser's first caption is not timed apart
    want, python_ms = [], []
    for image in pil_images:
        start = time.perf_counter()
        want.append(python.generate([image], return_ids=True)[0])
        python_ms.append((time.perf_counter() - start) * 1000)
    want_text = [python.decode(ids) for ids in want]
    assert any(want), "every caption is empty: the comparison would prove little"

    urls = [f"{base}/images/{p.name}" for p in images]
    got = _caption_in_page(browser, f"{base}/{name}/index.html", urls)
    assert [g["ids"] for g in got] == want
    assert [g["text"] for g in got] == want_text

    # the module's one-call API, as another page or an extension would use it
    text = browser.execute_async_script(
        "const [url, done] = arguments; import(new URL('vlmkit-web.js', location.href).href)"
        ".then(async (m) => done(await m.caption(await (await fetch(url)).blob())), (e) => done(String(e)));",
        urls[0],
    )
    assert text == want_text[0]

    # the preprocessing alone, bit for bit (a wrong pixel would show here before it flips a token)
    pixels = browser.execute_async_script(
        "const done = arguments[1]; window.vlmkitPage.preprocessUrl(arguments[0]).then(done);", urls[1]
    )
    expected = preprocess_images([pil_images[1]], python.manifest["preprocessing"])[0]
    np.testing.assert_array_equal(np.asarray(pixels, dtype=np.float32), expected.ravel())

    shot = work / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VLMKIT_WEB_SCREENSHOT"):
        shutil.copy2(shot, os.environ["VLMKIT_WEB_SCREENSHOT"])
    figures = {
        "variant": variant,
        "payload_mb": round(result.payload_bytes / 1e6, 2),
        "browser_ms": [round(g["ms"], 1) for g in got],
        "browser_ms_median_after_first": round(statistics.median(g["ms"] for g in got[1:]), 1),
        "python_ms": [round(ms, 1) for ms in python_ms],
        "tokens": [len(ids) for ids in want],
        "captions": want_text,
    }
    print(f"\n{name}: {json.dumps(figures)}")
    if os.environ.get("VLMKIT_WEB_REPORT"):
        report = Path(os.environ["VLMKIT_WEB_REPORT"])
        data = json.loads(report.read_text()) if report.is_file() else {}
        report.write_text(json.dumps({**data, name: figures}, indent=2) + "\n")
