"""The web export's own decoder format, and its arithmetic in numpy: what ``vlmkit-web.js`` computes.

Why a decoder of our own in the browser (measured, docs/browser.md "Where the time goes"):
onnxruntime-web's wasm kernels run a SmolLM2-135M step 5-10x slower than ONNX Runtime's native
ones (its float ``MatMul`` by a constant weight reads ~1.5 GB/s at one row; ``MatMulNBits``
dequantizes the whole weight on every call, 10-20x slower still; its int8 ``MatMulInteger`` path is
no faster than float at one row and quantizes activations per tensor, which turns SmolLM2's
captions into noise), and a graph with 0.5 GB of float32 initializers takes ~30 s to create. A
decoder step of a Llama-architecture LM is a few matrix-vector products and some vector
arithmetic, so the page runs it itself: the products in a small WebAssembly SIMD kernel
(``vlmkit-gemv.wat``, int8 weights x int16 activations, ~4x the float ``MatMul``'s speed), the rest in
JavaScript. The vision graph still runs in onnxruntime-web.

The format (``decoder.bin`` plus ``web.decoder`` in the manifest): every weight matrix ``[N, K]``
(output rows, input columns, as ``nn.Linear`` stores it) in int8 with one float16 scale per
``block`` (32) consecutive inputs of a row, symmetric (``w ~ q * s``; ``quantize_weight`` rounds
to the nearest step with ``s = max|w| / 127`` over the block, and the export chooses the layers'
values by error-compensating rounding instead, ``vlmkit.export.rounding``, which the runtimes need
not know); norms and biases in float32; the token-embedding table in the same int8 form,
which is also the LM head when the model ties them (SmolLM2 does: 28 MB instead of 113 + 113).
Activations entering each product are quantized to int16 with a scale per block of 32 (the
product of a block is exact in int32, then scaled by both scales and summed in float32), which
keeps SmolLM2's outlier channels (up to 8,000 times the median) without zeroing their neighbours.

``WebDecoder`` is that arithmetic in numpy (BLAS sums in another order than the page: the two
agree to ~1e-5 of the logits, not bit for bit); the export checks it against PyTorch, and the
browser tests check the page against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.core.errors import ArtifactError

#: inputs per weight/activation scale
BLOCK = 32
#: int16 activations: the largest magnitude of a block maps to this
ACTIVATION_MAX = 32767.0
#: int8 weights
WEIGHT_MAX = 127.0


def quantize_weight(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` float -> (int8 ``[N, K]``, float16 scales ``[N, K / block]``), symmetric per block."""
    n, k = w.shape
    blocks = w.astype(np.float32).reshape(n, k // block, block)
    scale = (np.abs(blocks).max(axis=2) / WEIGHT_MAX).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[..., None]), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return q.reshape(n, k), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, block: int = BLOCK) -> np.ndarray:
    n, k = q.shape
    return (q.reshape(n, k // block, block).astype(np.float32) * scale.astype(np.float32)[..., None]).reshape(
        n, k
    )


def quantize_activations(x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """``x`` as the page feeds it to a product: int16 per block of ``block``, dequantized (float32)."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(ACTIVATION_MAX)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    # the page rounds half away from zero (Math.round of |v| with the sign put back)
    q = np.sign(blocks) * np.floor(np.abs(blocks / scale) + 0.5)
    return (q * scale).reshape(x.shape).astype(np.float32)


def read_tensors(
    folder: Path, spec: dict[str, Any], files: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The tensors of ``decoder.bin`` as the manifest's ``web.decoder.tensors`` lays them out
    (gunzipped where ``files``, the manifest's ``web.files``, says the export stored it so)."""
    import gzip

    meta = (files or {}).get(spec["file"], {"path": spec["file"]})
    path = folder / meta["path"]
    if not path.is_file():
        raise ArtifactError(f"{folder} is incomplete: {meta['path']} is missing")
    if meta.get("encoding") == "gzip":
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8)
    else:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in spec["tensors"].items():
        end = t["offset"] + t["bytes"]
        if end > raw.size:
            raise ArtifactError(f"{path} is shorter than its manifest says ({name}); export the model again")
        out[name] = np.frombuffer(raw[t["offset"] : end], dtype=t["dtype"]).reshape(t["shape"])
    return out


class WebDecoder:
    """The page's decoder step in numpy, over an export folder's ``decoder.bin`` and manifest."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        spec = manifest["web"]["decoder"]
        self.arch = spec["architecture"]
        self.block = int(spec["block"])
        t = read_tensors(Path(folder), spec, manifest["web"].get("files"))
        deq = lambda name: dequantize_weight(t[f"{name}.q"], t[f"{name}.s"], self.block)  # noqa: E731
        self.embed = deq("embed")
        self.lm_head = self.embed if self.arch["tied"] else deq("lm_head")
        self.norm = t["norm"].astype(np.float32)
        self.layers = []
        for i in range(self.arch["layers"]):
            p = f"layers.{i}"
            layer = {n: deq(f"{p}.{n}") for n in ("q", "k", "v", "o", "gate", "up", "down")}
            for n in ("q", "k", "v"):
                layer[f"{n}_bias"] = t.get(f"{p}.{n}.bias")
            layer["input_norm"], layer["post_norm"] = t[f"{p}.input_norm"], t[f"{p}.post_norm"]
            self.layers.append(layer)
        self.inv_freq = np.asarray(self.arch["inv_freq"], dtype=np.float32)

    def embed_ids(self, ids: Sequence[int]) -> np.ndarray:
        return self.embed[np.asarray(ids, dtype=np.int64)]

    def _product(self, w: np.ndarray, x: np.ndarray, bias=None) -> np.ndarray:
        y = w @ quantize_activations(x, self.block)
        return y if bias is None else (y + bias).astype(np.float32)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return (weight * (x64 / np.sqrt(np.mean(x64 * x64) + self.arch["rms_eps"]))).astype(np.float32)

    def _rope(self, x: np.ndarray, position: int) -> np.ndarray:
        freqs = np.float32(position) * self.inv_freq
        cos = (np.cos(np.concatenate([freqs, freqs])) * self.arch["rope_scaling"]).astype(np.float32)
        sin = (np.sin(np.concatenate([freqs, freqs])) * self.arch["rope_scaling"]).astype(np.float32)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos + rotated * sin).astype(np.float32)

    def new_cache(self) -> list[tuple[list, list]]:
        return [([], []) for _ in self.layers]

    def step(self, x: np.ndarray, position: int, cache) -> np.ndarray:
        """One position through every layer (its keys/values appended to ``cache``); returns the
        logits ``[V]`` after it."""
        a = self.arch
        heads, kv_heads, dim = a["heads"], a["kv_heads"], a["head_dim"]
        group = heads // kv_heads
        for layer, (keys, values) in zip(self.layers, cache, strict=True):
            h = self._rms(x, layer["input_norm"])
            q = self._rope(self._product(layer["q"], h, layer["q_bias"]).reshape(heads, dim), position)
            k = self._rope(self._product(layer["k"], h, layer["k_bias"]).reshape(kv_heads, dim), position)
            v = self._product(layer["v"], h, layer["v_bias"]).reshape(kv_heads, dim)
            keys.append(k)
            values.append(v)
            kk, vv = np.stack(keys, axis=1), np.stack(values, axis=1)  # [kv_heads, T, dim]
            out = np.empty((heads, dim), dtype=np.float32)
            for head in range(heads):
                scores = kk[head // group].astype(np.float64) @ q[head] * a["scaling"]
                p = np.exp(scores - scores.max())
                out[head] = (p / p.sum()) @ vv[head // group]
            x = (x + self._product(layer["o"], out.reshape(-1))).astype(np.float32)
            h = self._rms(x, layer["post_norm"])
            g = self._product(layer["gate"], h).astype(np.float64)
            u = self._product(layer["up"], h)
            x = (x + self._product(layer["down"], (g / (1 + np.exp(-g)) * u).astype(np.float32))).astype(
                np.float32
            )
        return self._product(self.lm_head, self._rms(x, self.norm))

    def greedy(self, embeds: np.ndarray, max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
        """Greedy ids after the prompt ``embeds`` ``[T, D]`` (one position at a time, as the page)."""
        cache = self.new_cache()
        logits = None
        for position, x in enumerate(embeds):
            logits = self.step(x.astype(np.float32), position, cache)
        ids: list[int] = []
        position = len(embeds)
        while len(ids) < max_new_tokens:
            token = int(np.argmax(logits))
            if token in stop_ids:
                break
            ids.append(token)
            if len(ids) == max_new_tokens:
                break
            logits = self.step(self.embed[token], position, cache)
            position += 1
        return ids


class WebCaptioner:
    """Greedy captions of a web export whose decoder is the page's own (``web.decoder`` in its
    manifest), in Python: the vision graph in ONNX Runtime, the decoder in ``WebDecoder``. What the
    page computes, to ~1e-5 of the logits; the browser tests compare the two."""

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from vlmkit.runtime import onnx as onnx_runtime

        self.folder = Path(folder)
        self.manifest = onnx_runtime.read_onnx_manifest(self.folder)
        if "decoder" not in self.manifest.get("web", {}):
            raise ArtifactError(f"{self.folder} is not a web export with the page's own decoder")
        files = self.manifest["variants"][self.manifest["default_variant"]]
        self._runtime = onnx_runtime
        self.vision = ort.InferenceSession(
            str(self.folder / files["vision"]),
            onnx_runtime.session_options(threads),
            providers=["CPUExecutionProvider"],
        )
        self.decoder = WebDecoder(self.folder, self.manifest)
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest["tokenizer"]))
        self.stop_token_ids = [int(t) for t in self.manifest["tokens"]["stop_ids"]]

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        return self._runtime.preprocess_images(images, self.manifest["preprocessing"])

    def image_prefix(self, pixel_values: np.ndarray) -> np.ndarray:
        (prefix,) = self.vision.run(None, {self.manifest["vision"]["input"]: pixel_values.astype(np.float32)})
        return prefix

    def prompt(self, prefix: np.ndarray) -> np.ndarray:
        """``before + [image prefix] + after`` embedded: ``[T, D]`` for one image's prefix ``[K, D]``."""
        tokens = self.manifest["tokens"]
        parts = [self.decoder.embed_ids(tokens["before"]), prefix, self.decoder.embed_ids(tokens["after"])]
        return np.concatenate([p.reshape(-1, prefix.shape[-1]) for p in parts]).astype(np.float32)

    def generate(
        self, images=None, *, pixel_values=None, return_ids: bool = False, max_new_tokens: int | None = None
    ):
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        limit = max_new_tokens or int(self.manifest["generation"]["max_new_tokens"])
        ids = [
            self.decoder.greedy(self.prompt(p), limit, self.stop_token_ids)
            for p in self.image_prefix(pixel_values)
        ]
        return ids if return_ids else [self.decode(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if self.manifest["tokens"].get("clean_up_tokenization_spaces"):
            text = self._runtime.clean_up_tokenization(text)
        return text.strip()
