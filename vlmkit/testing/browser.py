"""Drive a ``vlmkit export --format web`` folder in a headless Chromium, for tests and benchmarks.

    with chromium() as browser, serve(root) as base:
        page = caption_in_page(browser, f"{base}/my-export/index.html", [f"{base}/images/a.png"])

``chromium()`` starts Debian's ``chromium`` through its ``chromedriver`` with Selenium (``pip
install selenium``) and raises ``BrowserMissing`` naming what is missing and how to install it.
``serve(root)`` serves a folder on 127.0.0.1 with the cross-origin-isolation headers, so that
onnxruntime-web may use wasm threads. ``python_captions`` captions the same images with the Python
ONNX runtime over the same folder: what the page must reproduce, token for token.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
#: WebGPU without a GPU: Chromium's SwiftShader Vulkan (Debian's chromium ships libvk_swiftshader.so)
WEBGPU_FLAGS = (
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--use-vulkan=swiftshader",
    "--use-webgpu-adapter=swiftshader",
    "--use-angle=swiftshader",
)


class BrowserMissing(RuntimeError):
    """Chromium, chromedriver or selenium is not installed."""


@contextlib.contextmanager
def chromium(
    *, width: int = 960, height: int = 640, timeout: float = 900, webgpu: bool = False
) -> Iterator[Any]:
    """A headless Chromium (``VLMKIT_CHROMIUM`` or the first of chromium, chromium-browser,
    google-chrome on PATH) driven by Selenium through the system's chromedriver. GPU off, so the
    page runs onnxruntime-web's wasm backend; with ``webgpu``, WebGPU on SwiftShader (Chromium's
    software Vulkan, on the CPU: it exercises the WebGPU code path, not a GPU's speed).
    ``timeout``: seconds a script in the page may take (a real model's first caption on a busy
    machine takes minutes)."""
    binary = os.environ.get("VLMKIT_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if binary is None or driver_path is None or webdriver is None:
        missing = "Chromium" if binary is None else "chromedriver" if driver_path is None else "selenium"
        raise BrowserMissing(f"the browser runtime's checks need {missing}: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", *(WEBGPU_FLAGS if webgpu else ("--disable-gpu",))):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.vlmkit_binary = binary  # for browser_version
    try:
        driver.set_window_size(width, height)
        driver.set_script_timeout(timeout)
        driver.command_executor.client_config.timeout = timeout
        yield driver
    finally:
        driver.quit()


def browser_version(driver) -> str:
    """``"chromium 150.0..."``: the browser's binary and version (the driver calls Chromium "chrome")."""
    binary = Path(
        getattr(driver, "vlmkit_binary", "") or driver.capabilities.get("browserName", "chrome")
    ).name
    return f"{binary} {driver.capabilities.get('browserVersion', '?')}"


class _Handler(SimpleHTTPRequestHandler):
    # cross-origin isolation, so that onnxruntime-web may use wasm threads
    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(root: str | Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def console(driver) -> list[str]:
    """The page's last console lines (a diagnostic for failures)."""
    try:
        return [entry["message"] for entry in driver.get_log("browser")][-5:]
    except Exception:  # noqa: BLE001 - logs are a diagnostic only
        return []


def caption_in_page(driver, page_url: str, image_urls: list[str]) -> dict[str, Any]:
    """Open the export's ``index.html`` at ``page_url``, wait for the model and caption each image
    through the page (one at a time, as a user dropping them would see them).

    Returns ``{"load_s", "backend", "captions": [{text, ids, ms, preprocessMs, visionMs, tokens}]}``;
    ``AssertionError`` with the page's console when the model does not load or a caption fails."""
    start = time.perf_counter()
    driver.get(page_url)
    ready = driver.execute_async_script(
        "const done = arguments[0]; window.vlmkitPage.ready.then(done, (e) => done(String(e)));"
    )
    assert ready is True, f"the page did not load the model: {ready}; console: {console(driver)}"
    load_s = time.perf_counter() - start
    backend = driver.execute_script("return document.getElementById('status').textContent")
    captions = []
    for url in image_urls:
        result = driver.execute_async_script(
            "const done = arguments[1]; window.vlmkitPage.captionUrl(arguments[0])"
            ".then(done, (e) => done({error: String(e)}));",
            url,
        )
        assert "error" not in result, f"{url}: {result['error']}; console: {console(driver)}"
        captions.append(result)
    return {"load_s": load_s, "status": backend, "captions": captions}


def python_captions(folder: str | Path, images: list, *, threads: int | None = None) -> dict[str, Any]:
    """The Python ONNX runtime's captions of PIL ``images`` over the export ``folder``, one image at
    a time after one warm-up caption: ``{"ids": [[...]], "text": [...], "ms": [...]}``. A web
    export with the page's own decoder is captioned by ``vlmkit.runtime.web_decoder.WebCaptioner``
    (its arithmetic in numpy), any other by ``OnnxCaptioner``."""
    from vlmkit.runtime.onnx import OnnxCaptioner, read_onnx_manifest
    from vlmkit.runtime.web_decoder import WebCaptioner

    own = "decoder" in read_onnx_manifest(folder).get("web", {})
    captioner = (WebCaptioner if own else OnnxCaptioner)(folder, threads=threads)
    captioner.generate(images[:1])  # warm-up: the page's first caption is not timed apart either
    ids, ms = [], []
    for image in images:
        start = time.perf_counter()
        ids.append(captioner.generate([image], return_ids=True)[0])
        ms.append((time.perf_counter() - start) * 1000)
    return {"ids": ids, "text": [captioner.decode(i) for i in ids], "ms": ms, "captioner": captioner}
