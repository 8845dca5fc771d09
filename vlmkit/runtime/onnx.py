"""Caption images with an ONNX export of a vlmkit model: ONNX Runtime, numpy, Pillow, tokenizers.

No torch, no transformers, no plugin: everything model-specific is in the folder that
``vlmkit export --format onnx`` writes::

    vlmkit-onnx.json      what the graphs take and give, the prompt token ids, stop/pad ids,
                          the past key/value layout and the image preprocessing (below)
    vision.onnx           pixels [B, 3, H, W] -> image prefix embeddings [B, K, D]
    decoder.onnx          one step of the LM (LoRA merged): inputs_embeds [B, T, D], attention_mask
                          [B, P+T], position_ids [B, T], past key/values -> last-position logits
                          [B, 1, V] and present key/values
    embed_tokens.npy      the LM's token-embedding table [V, D]
    *.int8.onnx, *.int4.onnx   the decoder graph with int8 or int4 weights (``--quantize``)
    tokenizer.json        for decoding the generated ids

Each variant (``variants`` in the manifest) names its ``vision`` and ``decoder`` graphs, and may
name a ``prompt_decoder``: the graph that runs the prompt pass (the image prefix and the prompt,
once per caption), while ``decoder`` runs each generated token. A quantized variant of
``--format onnx`` names the fp32 decoder there (and the fp32 vision graph): the prompt pass
decides the first word and fills the key/value cache every later step reads, so it is where a
quantization error costs the most captions, and it is one decoder run of ten (see
``vlmkit.export.quantize``).

Generation mirrors ``PrefixConditioningVLM.generate``: the prompt is ``before + [image prefix] +
after``, one forward pass over it fills the key/value cache, then each step feeds one token per
row. Every row shares the prompt, so no row is padded; a row that has stopped keeps receiving
the pad token (as Hugging Face's greedy search does) until every row has stopped.

Preprocessing reproduces the encoder plugin's own (checked at export time against it): resize
with the same filter *and the same implementation* (Pillow, or torchvision's uint8 antialiased
kernel that transformers' image processors use, which rounds differently from Pillow), centre
crop with the same rounding, rescale, normalise.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.core.contracts import RESAMPLE, cut_at_stop, image_size_problem
from vlmkit.core.errors import ArtifactError, ConfigError, DataError
from vlmkit.core.paths import read_manifest

MANIFEST = "vlmkit-onnx.json"
FORMAT = "vlmkit-onnx"
#: 2: a variant may name a ``prompt_decoder`` (a runtime of format 1 would ignore it)
FORMAT_VERSION = 2
VARIANTS = ("fp32", "int8", "int4")


# ----------------------------------------------------------------------------- preprocessing


def preprocess_images(images: Sequence[Any], spec: dict[str, Any]) -> np.ndarray:
    """RGB PIL images -> float32 pixels ``[B, 3, H, W]`` as described by ``spec``.

    ``spec`` (the manifest's ``preprocessing``)::

        {"resize": {"size": {"height": H, "width": W} | {"shortest_edge": S},
                    "resample": "bicubic", "backend": "pil" | "torchvision"} | null,
         "center_crop": {"height": h, "width": w, "rounding": "floor" | "round"} | null,
         "rescale_factor": 1/255, "mean": [3 floats], "std": [3 floats], "input_size": [H, W]}
    """
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, 1, 3)
    rescale = np.float32(spec["rescale_factor"])
    out = []
    for image in images:
        if not hasattr(image, "convert"):
            raise DataError(f"expected PIL images, got a {type(image).__name__}")
        if problem := image_size_problem(image.width, image.height, spec.get("resize")):
            raise DataError(f"image {len(out)} of the batch {problem}")  # before resizing it
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = _resize(image, spec.get("resize"))
        crop = spec.get("center_crop")
        if crop:
            pixels = _center_crop(pixels, crop["height"], crop["width"], crop.get("rounding", "floor"))
        x = (pixels.astype(np.float32) * rescale - mean) / std
        out.append(x.transpose(2, 0, 1))
    want = tuple(spec["input_size"])
    if not out:
        return np.zeros((0, 3, *want), dtype=np.float32)
    batch = np.ascontiguousarray(np.stack(out))
    if batch.shape[-2:] != want:
        raise ArtifactError(f"preprocessing made {batch.shape[-2:]} images but the vision graph takes {want}")
    return batch


def resize_size(width: int, height: int, size: dict[str, int]) -> tuple[int, int]:
    """``(height, width)`` after resizing: exact, or the shortest edge to ``shortest_edge`` with
    the aspect ratio kept (long side rounded down, as transformers and torchvision do)."""
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def _resize(image, resize: dict[str, Any] | None) -> np.ndarray:
    if not resize:
        return np.asarray(image, dtype=np.uint8)
    height, width = resize_size(image.width, image.height, resize["size"])
    if (height, width) == (image.height, image.width):
        return np.asarray(image, dtype=np.uint8)
    if resize.get("backend", "pil") == "torchvision":
        return resize_uint8_antialiased(np.asarray(image, dtype=np.uint8), height, width, resize["resample"])
    return np.asarray(image.resize((width, height), resample=RESAMPLE[resize["resample"]]), dtype=np.uint8)


def _center_crop(pixels: np.ndarray, height: int, width: int, rounding: str) -> np.ndarray:
    h, w = pixels.shape[:2]
    if height > h or width > w:  # pad with zeros first, as transformers and torchvision do
        top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), dtype=pixels.dtype)
        padded[top : top + h, left : left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    # transformers floors the offset; torchvision rounds it (Python's round: half to even)
    cut = (lambda v: int(v)) if rounding == "floor" else (lambda v: int(round(v)))
    top, left = cut((h - height) / 2.0), cut((w - width) / 2.0)
    return pixels[top : top + height, left : left + width]


# torchvision's antialiased uint8 resize (ATen's separable kernel, derived from Pillow-SIMD): float64
# filter weights as in Pillow, turned into int16 with as many fraction bits as fit, integer sums,
# horizontal pass first. Pillow itself uses a fixed 22-bit precision, so the two round differently.


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


def resize_uint8_antialiased(pixels: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
    """``[H, W, C]`` uint8 -> ``[height, width, C]`` uint8, bit-exact with
    ``torchvision.transforms.v2.functional.resize(..., antialias=True)`` on a CPU uint8 tensor."""
    if resample not in _FILTERS:
        raise ConfigError(
            f"resample {resample!r} with the torchvision backend is not supported "
            f"(supported: {', '.join(_FILTERS)})"
        )
    if pixels.shape[1] != width:
        pixels = _resample_axis(pixels, width, resample, axis=1)
    if pixels.shape[0] != height:
        pixels = _resample_axis(pixels, height, resample, axis=0)
    return pixels


def _resample_axis(pixels: np.ndarray, out_size: int, resample: str, axis: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    index, weights = _filter_taps(in_size, out_size, resample)
    kernel, precision = _int16_weights(weights)
    # |sum| <= 255 * sum(|kernel|) ~ 255 * 1.3 * 2**15: int32 holds it
    x = np.moveaxis(pixels, axis, 0).astype(np.int32)
    acc = np.full((out_size, *x.shape[1:]), 1 << (precision - 1), dtype=np.int32)
    trailing = (1,) * (x.ndim - 1)
    for tap in range(index.shape[1]):
        acc += x[index[:, tap]] * kernel[:, tap].reshape(-1, *trailing)
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _filter_taps(in_size: int, out_size: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    fn, base_support = _FILTERS[resample]
    scale = in_size / out_size
    support = base_support * scale if scale >= 1.0 else base_support
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), taps)
        j = np.arange(n)
        w = fn((j + lo - center + 0.5) * inv_scale)
        total = w.sum()
        weights[i, :n] = w / total if total != 0.0 else w
        index[i, :n] = lo + j
        index[i, n:] = lo  # weight 0
    return index, weights


def _int16_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
    w_max = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    kernel = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return kernel, precision


# ----------------------------------------------------------------------------- the folder


def read_onnx_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an ONNX export; ``ArtifactError`` when ``folder`` is not one."""
    return read_manifest(folder, MANIFEST, format=FORMAT, version=FORMAT_VERSION, what="vlmkit ONNX export",
                         make="make one with 'vlmkit export --format onnx'")  # fmt: skip


def session_options(threads: int | None = None):
    """ONNX Runtime options for CPU inference: every graph optimisation, one intra-op thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or _cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


#: ``--provider`` names -> ONNX Runtime execution providers, in the order tried (CPU last: ORT places
#: there what the GPU provider does not run)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def execution_providers(provider: str = "cpu") -> list[str]:
    """The ONNX Runtime providers for ``provider`` (``cpu`` or ``cuda``); ``ConfigError`` in one
    line when this ONNX Runtime lacks it (the CUDA provider comes with ``onnxruntime-gpu``)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; use {' or '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[provider][0] not in available:
        raise ConfigError(
            f"provider {provider}: this ONNX Runtime has no {PROVIDERS[provider][0]} (it has "
            f"{', '.join(available)}); install onnxruntime-gpu with a matching CUDA (pip uninstall "
            "onnxruntime first: the two conflict), or use --provider cpu"
        )
    return PROVIDERS[provider]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxCaptioner:
    """Greedy captions from an ONNX export, with a key/value cache.

    ``variant`` is ``fp32``, ``int8`` or ``int4`` (default: the manifest's ``default_variant``, the
    quantized one when the export was quantized). ``threads`` defaults to the number of usable cores.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        variant: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = read_onnx_manifest(self.folder)
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant", "fp32")
        if self.variant not in variants:
            raise ConfigError(
                f"{self.folder} has no {self.variant!r} variant; it has {', '.join(variants)}"
                + (f" (export with --quantize {self.variant})" if self.variant in VARIANTS[1:] else "")
            )
        files = variants[self.variant]
        if "decoder" not in files and "web_decoder" in files:  # a web export's own decoder format
            raise ArtifactError(
                f"{self.folder} is a web export whose decoder runs in the page's own runtime, not ONNX "
                "Runtime: open its index.html, or use vlmkit.runtime.web_decoder.WebCaptioner"
            )
        prompt_graph = files.get("prompt_decoder")
        for name in (
            files["vision"],
            files["decoder"],
            *([prompt_graph] if prompt_graph else []),
            self.manifest["embed_tokens"],
            self.manifest["tokenizer"],
        ):
            if not (self.folder / name).is_file():
                raise ArtifactError(f"{self.folder} is incomplete: {name} is missing")
        options = session_options(threads)
        providers = list(providers or ["CPUExecutionProvider"])
        with self._reading(files["vision"]):
            self.vision = ort.InferenceSession(
                str(self.folder / files["vision"]), options, providers=providers
            )
        with self._reading(files["decoder"]):
            self.decoder = ort.InferenceSession(
                str(self.folder / files["decoder"]), options, providers=providers
            )
        self.prompt_decoder = self.decoder
        if prompt_graph and prompt_graph != files["decoder"]:
            with self._reading(prompt_graph):
                self.prompt_decoder = ort.InferenceSession(
                    str(self.folder / prompt_graph), options, providers=providers
                )
        with self._reading(self.manifest["embed_tokens"]):
            self.embed_tokens = np.load(self.folder / self.manifest["embed_tokens"], mmap_mode="r")
        with self._reading(self.manifest["tokenizer"]):
            self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest["tokenizer"]))
        tokens = self.manifest["tokens"]
        self.stop_token_ids = [int(t) for t in tokens["stop_ids"]]
        self.pad_token_id = int(tokens["pad_id"])
        self._stops = np.asarray(self.stop_token_ids, dtype=np.int64)
        dec = self.manifest["decoder"]
        self._past_names = [n for n in dec["inputs"] if n.startswith("past_key_values.")]
        self._kv_shape = (dec["num_kv_heads"], dec["head_dim"])
        self._dtype = np.dtype(dec["dtype"])
        #: where the key/value cache lives between steps (``_step``): the first provider's device
        self._cache_device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"

    @contextlib.contextmanager
    def _reading(self, name: str):
        """A damaged file of the export is one line naming it, not ONNX Runtime's or numpy's traceback."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - InvalidProtobuf, ValueError (mmap length), ...
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{self.folder / name} is damaged ({why}); export the model again") from None

    @property
    def prefix_tokens(self) -> int:
        return int(self.manifest["vision"]["prefix_tokens"])

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images -> pixel values ``[B, 3, H, W]`` (float32), as the encoder plugin makes them."""
        return preprocess_images(images, self.manifest["preprocessing"])

    def image_prefix(self, pixel_values: np.ndarray) -> np.ndarray:
        """Pixel values -> image prefix embeddings ``[B, K, D]``."""
        (prefix,) = self.vision.run(None, {self.manifest["vision"]["input"]: pixel_values.astype(np.float32)})
        return prefix

    def generate(
        self,
        images: Sequence[Any] | None = None,
        *,
        pixel_values: np.ndarray | None = None,
        max_new_tokens: int | None = None,
        return_ids: bool = False,
        prompt: str | None = None,
        num_beams: int = 1,
        do_sample: bool = False,
        **ignored: Any,
    ) -> list[str] | list[list[int]]:
        """Greedy captions for PIL ``images`` (or ready ``pixel_values``), like
        ``PrefixConditioningVLM.generate``. The prompt is the one the model was exported with."""
        if num_beams != 1 or do_sample:
            raise ConfigError("the ONNX runtime decodes greedily: num_beams and sampling are not supported")
        if prompt is not None and prompt != self.manifest["tokens"].get("prompt"):
            raise ConfigError(
                "the ONNX export has its prompt built in "
                f"({self.manifest['tokens'].get('prompt')!r}); export again to change it"
            )
        if (images is None) == (pixel_values is None):
            raise ValueError("generate needs exactly one of images or pixel_values")
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        if len(pixel_values) == 0:
            return []
        limit = max_new_tokens or int(self.manifest["generation"]["max_new_tokens"])
        ids = self._greedy(self.image_prefix(pixel_values), limit)
        if return_ids:
            return ids
        return [self.decode(row) for row in ids]

    def caption(self, images: Sequence[Any], **kwargs: Any) -> list[str]:
        return self.generate(images, **kwargs)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> caption text, as the model's transformers tokenizer decodes it."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if self.manifest["tokens"].get("clean_up_tokenization_spaces"):
            text = clean_up_tokenization(text)
        return text.strip()

    def teacher_forced_logits(
        self, pixel_values: np.ndarray, targets: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Teacher forcing, one image at a time: for each image and its target ids, the logits
        ``[len(target), V]`` before each target token (from the prompt, then after each given
        token), through the same embedding table, prompt and decoder steps as ``generate``. The
        export checks them against PyTorch's logits for the same ids."""
        out = []
        for pixels, target in zip(pixel_values, targets, strict=True):
            embeds, length = self._prompt(self.image_prefix(pixels[None]))
            logits, past = self._step(embeds, length, self._empty_past(1), prompt=True)
            rows = [logits[0, -1]]  # the prompt predicts target[0], then each token the next
            for token in target[:-1]:
                embeds, length = self._embed([token])[:, None], length + 1
                logits, past = self._step(embeds, length, past)
                rows.append(logits[0, -1])
            out.append(np.stack(rows))
        return out

    def _embed(self, ids) -> np.ndarray:
        return np.asarray(self.embed_tokens[np.asarray(ids, dtype=np.int64)], dtype=self._dtype)

    def _prompt(self, prefix: np.ndarray) -> tuple[np.ndarray, int]:
        """``before + [image prefix] + after`` embedded, for every row; and its length."""
        tokens, batch = self.manifest["tokens"], prefix.shape[0]
        before, after = self._embed(tokens["before"]), self._embed(tokens["after"])
        parts = [np.broadcast_to(before, (batch, *before.shape)), prefix.astype(self._dtype)]
        parts.append(np.broadcast_to(after, (batch, *after.shape)))
        embeds = np.ascontiguousarray(np.concatenate(parts, axis=1))
        return embeds, embeds.shape[1]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self._kv_shape[0], 0, self._kv_shape[1]), dtype=self._dtype)
        return dict.fromkeys(self._past_names, empty)

    def _step(
        self, embeds: np.ndarray, length: int, past: dict, *, prompt: bool = False
    ) -> tuple[np.ndarray, dict]:
        """One decoder run over ``embeds`` (the last ``embeds.shape[1]`` of ``length`` positions);
        ``prompt``: the prompt pass, on the variant's ``prompt_decoder``.

        Through IO binding, so the key/value cache stays where the provider computed it: an ONNX
        Runtime value in GPU memory under the CUDA provider, bound as the next step's input as it
        is. Only the logits come to the host (``run`` would copy the whole cache there and back
        every token)."""
        batch, new = embeds.shape[:2]
        session = self.prompt_decoder if prompt else self.decoder
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        binding.bind_cpu_input("attention_mask", np.ones((batch, length), dtype=np.int64))
        positions = np.arange(length - new, length, dtype=np.int64)[None].repeat(batch, 0)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        logits_name, *present_names = (o.name for o in session.get_outputs())
        binding.bind_output(logits_name)  # on the host
        for name in present_names:
            binding.bind_output(name, self._cache_device)
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), dict(zip(self._past_names, present, strict=True))

    def _greedy(self, prefix: np.ndarray, max_new_tokens: int) -> list[list[int]]:
        batch = prefix.shape[0]
        embeds, length = self._prompt(prefix)
        past = self._empty_past(batch)
        generated = np.zeros((batch, 0), dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        for i in range(max_new_tokens):
            logits, past = self._step(embeds, length, past, prompt=i == 0)
            next_ids = logits[:, -1].argmax(-1).astype(np.int64)
            next_ids[done] = self.pad_token_id  # a finished row only waits for the others
            generated = np.concatenate([generated, next_ids[:, None]], axis=1)
            done |= np.isin(next_ids, self._stops)
            if done.all():
                break
            embeds, length = self._embed(next_ids)[:, None], length + 1

        return cut_at_stop(generated.tolist(), self.stop_token_ids)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and contractions."""
    for a, b in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(a, b)
    return text


def load(folder: str | Path, **kwargs: Any) -> OnnxCaptioner:
    """``OnnxCaptioner(folder, **kwargs)``: what ``vlmkit caption --onnx DIR`` runs."""
    return OnnxCaptioner(folder, **kwargs)
