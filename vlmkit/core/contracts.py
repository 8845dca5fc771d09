"""What a plugin provides: encoder, decoder and dataset specs.

A *spec* is a small object registered under an exact lowercase name. It declares what makes its
family different (checkpoints, LoRA targets, prompt format, preprocessing, splits) and knows how
to load the real thing. Specs are imported by ``vlmkit plugins list``, so a spec module must not
import torch or transformers at import time: import them inside ``load``.

Read this file together with ``hookspecs.py``; ``docs/plugins.md`` walks through an example.
"""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from vlmkit.core.errors import DataError, PluginError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import PIL.Image
    import torch
    from pydantic import BaseModel

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")

SPLITS = ("train", "validation", "test")
#: decoder formatting styles: ``auto`` = the chat template when the tokenizer has one, else plain
STYLES = ("auto", "chat", "plain")
#: resampling filters by name in ``VisionEncoder.image_processing`` (values: ``PIL.Image.Resampling``)
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class PluginSpec(ABC):
    """Fields every spec declares. Subclasses set them as class attributes."""

    kind: ClassVar[str]
    #: exact, lowercase registry name (``siglip``, ``qwen2``, ``shapes``)
    name: ClassVar[str]
    #: one line, shown by ``vlmkit plugins list``
    description: ClassVar[str] = ""
    #: checkpoint used when the user names none (a hub id, a local path or a named checkpoint)
    default_checkpoint: ClassVar[str | None] = None
    #: named checkpoints this plugin understands besides hub ids/paths: name -> one-line explanation
    checkpoints: ClassVar[Mapping[str, str]] = {}

    def describe(self) -> dict[str, Any]:
        """Everything the spec declares, as JSON-able data (``vlmkit plugins show``)."""
        out: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            for key, value in vars(klass).items():
                if key.startswith("_"):
                    continue
                if isinstance(value, type) and hasattr(value, "model_json_schema"):  # an options model
                    out[key] = value.model_json_schema().get("properties", {})
                elif not (callable(value) or isinstance(value, (classmethod, staticmethod, property))):
                    out[key] = _jsonable(value)
        out["kind"] = self.kind
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, type):
        return value.__name__
    return str(value)


# --------------------------------------------------------------------------------------- encoders


@runtime_checkable
class VisionEncoder(Protocol):
    """A loaded vision encoder: a ``torch.nn.Module`` with these extra attributes.

    ``forward(pixel_values)`` returns features ``[B, num_tokens, feature_dim]``. vlmkit freezes it
    (``requires_grad_(False)`` and ``eval()``) unless the user unfreezes its last layers.
    """

    #: N, tokens per image
    num_tokens: int
    #: Dv, feature width
    feature_dim: int
    #: (rows, cols) when the tokens form a grid (row-major); ``None`` when they do not.
    #: Pooling and pixel-shuffle need it.
    grid: tuple[int, int] | None
    #: ``preprocess`` as data, so runtimes without the plugin (ONNX, the browser) reproduce it::
    #:
    #:     {"input_size": [H, W],
    #:      "resize": {"size": {"height": H, "width": W} | {"shortest_edge": S},
    #:                 "resample": "bicubic" (a ``RESAMPLE`` name), "backend": "pil" | "torchvision"} | None,
    #:      "center_crop": {"height": h, "width": w, "rounding": "floor" | "round"} | None,
    #:      "rescale_factor": 1/255, "mean": [r, g, b], "std": [r, g, b]}
    #:
    #: ``None`` when the preprocessing cannot be said this way (export then refuses the encoder).
    #: Export checks the declaration against ``preprocess`` on awkward images before it writes.
    image_processing: Mapping[str, Any] | None

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """PIL images (other modes as ``convert("RGB")``) -> ``[B, 3, H, W]`` as the checkpoint expects."""

    def fingerprint(self) -> str:
        """A string that changes whenever features could change: weights, revision, preprocessing
        (image size, normalisation, resampling), feature layer. The feature cache keys on it."""

    def layers(self) -> Sequence[torch.nn.Module]:
        """The encoder's blocks in order, so the last N can be unfrozen."""


class EncoderSpec(PluginSpec):
    """A family of vision encoders (SigLIP, CLIP, timm backbones, ...)."""

    kind: ClassVar[str] = "encoder"
    #: model of ``model.encoder_options`` (``load(options=)`` when set); they must change ``fingerprint()``
    options: ClassVar[type[BaseModel] | None] = None

    @abstractmethod
    def load(self, checkpoint: str | None = None, *, revision: str | None = None) -> VisionEncoder:
        """Load ``checkpoint`` (default: ``default_checkpoint``); fail with ``PluginError`` naming
        the checkpoint when it is not of this family."""


# --------------------------------------------------------------------------------------- decoders


@dataclass(frozen=True)
class Formatted:
    """One example's token ids around the image prefix.

    The model sees ``before + [image prefix] + after + target``. Labels are ``-100`` everywhere
    except on ``target``, which holds the caption tokens followed by the end token(s) the model
    must learn to emit. At generation time ``target`` is empty and the model continues after
    ``after``.
    """

    before: list[int]
    after: list[int]
    target: list[int] = field(default_factory=list)


def cut_at_stop(rows: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row of generated ids up to, not including, its first stop token (``stop_token_ids``)."""
    stops = set(stop_ids)
    return [list(itertools.takewhile(lambda token: token not in stops, row)) for row in rows]


class DecoderSpec(PluginSpec):
    """A family of decoder-only language models (SmolLM/Llama, Qwen2, Phi, GPT-2, ...).

    Everything family-specific lives here; core never matches model names.
    """

    kind: ClassVar[str] = "decoder"
    #: ``config.model_type`` values this family accepts (a checkpoint of another type is refused)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: LoRA target module names (last name component, e.g. ``q_proj``), each of which the loaded
    #: model must have; or, for a family whose architectures name them differently, a mapping
    #: ``model_type -> names``
    lora_targets: ClassVar[tuple[str, ...] | Mapping[str, tuple[str, ...]]] = ()
    #: class name of one transformer block, for FSDP auto-wrapping
    layer_class: ClassVar[str | None] = None
    #: False when the family's activations overflow fp16 (NaN losses): ``auto`` then picks fp32 on
    #: a GPU without bf16, and ``--precision fp16`` is refused
    fp16_safe: ClassVar[bool] = True

    @abstractmethod
    def load(self, checkpoint: str | None = None, *, revision: str | None = None, dtype: Any = None):
        """Return ``(model, tokenizer)``: a causal LM and its tokenizer, with a pad token set."""

    @abstractmethod
    def format(self, tokenizer: Any, prompt: str, caption: str | None, style: str = "auto") -> Formatted:
        """Token ids for one example. ``style`` is ``auto`` (chat template when the tokenizer has
        one), ``chat`` or ``plain``. ``caption=None`` formats for generation."""

    @abstractmethod
    def stop_token_ids(self, tokenizer: Any, style: str = "auto") -> list[int]:
        """Token ids that end a caption (EOS, ``<|im_end|>``, ...)."""

    @abstractmethod
    def resolve_lora_targets(self, model: Any, targets: Sequence[str] | None = None) -> list[str]:
        """Names of the modules of ``model`` LoRA adapts (``targets`` overrides ``lora_targets``);
        ``PluginError`` when none match."""

    def lora_kwargs(self, model: Any, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """``peft.LoraConfig`` arguments for ``model``: ``target_modules`` and whatever else the
        family needs (e.g. ``fan_in_fan_out=True`` for GPT-2's Conv1D layers)."""
        return {"target_modules": self.resolve_lora_targets(model, targets)}


# --------------------------------------------------------------------------------------- datasets


@dataclass
class CaptionExample:
    """One image with one or more reference captions.

    ``image`` is a PIL image, a path, raw bytes, or a zero-argument callable returning a PIL image
    (so large datasets decode lazily). ``load_image`` turns any of them into an RGB PIL image.
    """

    id: str
    captions: list[str]
    image: Any

    def _named(self) -> str:
        """The id, and the file when the id is not its path: ``'coco-123' (/data/123.jpg)``."""
        source = self.image
        if isinstance(source, (str, Path)) and str(source) != str(self.id):
            return f"{self.id!r} ({source})"
        return repr(self.id)

    def load_image(self, *, draft: bool = False) -> PIL.Image.Image:
        """The image in RGB, upright (EXIF orientation applied), 16-bit greyscale scaled to 8 bits.
        Whatever is wrong (missing, not a regular file, too large, a decompression bomb, corrupt)
        is one ``DataError`` line naming it. ``draft``: a JPEG at 1/8 scale (a quick check)."""
        from PIL import UnidentifiedImageError

        try:
            source = self.image() if callable(self.image) else self.image
            if isinstance(source, (str, Path)):
                source = read_image_file(source)
            return _upright_rgb(source, draft)
        except FileNotFoundError as exc:
            raise DataError(f"image {self._named()}: file not found") from exc
        except UnidentifiedImageError as exc:  # its message repeats the path, or shows a BytesIO
            raise DataError(
                f"image {self._named()} is not a readable image (unknown format or corrupt data)"
            ) from exc
        except _Refused as exc:
            raise DataError(f"image {self._named()} {exc}") from exc
        except DataError:  # a plugin's loader (a failed download) already says what and where
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types for bad data
            why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            raise DataError(f"image {self._named()} is not a readable image ({why.splitlines()[0]})") from exc


#: image files larger than this are refused unread
MAX_IMAGE_BYTES = 256 * 2**20
#: images longer than this many times their width (or wider than their height) are refused before
#: decoding: resizing the shortest edge to an encoder's size multiplies a thin strip's pixels
#: (1x60000 at a 224-pixel shortest edge: 13 G pixels). Panoramas stay well under it.
MAX_ASPECT_RATIO = 50
#: the most pixels an image may have after resizing (the declared ``resize``), checked before it
MAX_RESIZED_PIXELS = 64 * 2**20


def image_size_problem(width: int, height: int, resize: Mapping[str, Any] | None = None) -> str | None:
    """What is wrong with an image of ``width`` x ``height`` pixels, read from its header (before
    it is decoded or resized), or ``None``: more pixels than Pillow's ``MAX_IMAGE_PIXELS``, an
    aspect ratio over ``MAX_ASPECT_RATIO``, or, given the declared ``resize`` step of an encoder's
    ``image_processing``, more than ``MAX_RESIZED_PIXELS`` once resized."""
    from PIL import Image

    pixels, limit = width * height, Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:  # Pillow only warns up to twice its limit: refuse from the limit on
        return f"has {pixels} pixels, more than {limit}: a decompression bomb?"
    if min(width, height) < 1:
        return f"is {width}x{height} pixels: empty"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (
            f"is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times longer than wide: resizing it "
            "would multiply its pixels; crop it"
        )
    size = (resize or {}).get("size") or {}
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        resized = edge * edge * max(width, height) // min(width, height)
        if resized > MAX_RESIZED_PIXELS:
            return (
                f"is {width}x{height} pixels: {resized} once resized to a shortest edge of {edge}, too many"
            )
    return None


class _Refused(DataError):
    """An image refused before decoding; ``load_image`` puts its name in front."""


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular file (a FIFO would block, ``/dev/zero`` never end) of at most
    ``MAX_IMAGE_BYTES``. ``FileNotFoundError``, ``OSError`` or ``DataError``."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without a writer
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # what was opened, not what the path names now
        os.close(fd)
        raise _Refused("is not a regular file (a folder, pipe or device)")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise _Refused(f"is larger than {MAX_IMAGE_BYTES // 2**20} MiB, the most vlmkit reads")
    return data


def _upright_rgb(image: Any, draft: bool) -> PIL.Image.Image:
    import io

    from PIL import Image, ImageOps

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(image))  # over twice MAX_IMAGE_PIXELS: DecompressionBombError
    if not hasattr(image, "convert"):
        raise _Refused(f"is a {type(image).__name__}, not an image")
    if problem := image_size_problem(image.width, image.height):  # from the header, before decoding
        raise _Refused(problem)
    if draft:
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image = ImageOps.exif_transpose(image)  # loads it; phone photos are stored sideways with a tag
    if image.mode == "F":  # 32-bit float (TIFF): convert("L") clips, and 0..1 data would turn black
        import numpy as np

        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0  # 0..1 floats, else 0..255
        image = Image.fromarray(np.clip((values * scale).round(), 0, 255).astype(np.uint8), "L")
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        import numpy as np  # convert("RGB") clips 16-bit values: mid grey would turn white

        grey = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


class CaptionDataset(Protocol):
    """A split: a sized, indexable collection of ``CaptionExample`` with a content fingerprint."""

    #: changes whenever the examples (images or their order) change; the feature cache keys on it
    fingerprint: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> CaptionExample: ...


class DatasetSpec(PluginSpec):
    """A source of captioned images with seeded, disjoint train/validation/test splits."""

    kind: ClassVar[str] = "dataset"
    #: pydantic model of the options this dataset takes (``path``, ``captions_file``, ...);
    #: ``None`` when it takes none
    options: ClassVar[type[BaseModel] | None] = None
    #: True when loading a split never reaches the network (drawn images, a local folder): what
    #: tools that only *may* read the data (the web export's calibration) check first
    local: ClassVar[bool] = False

    @abstractmethod
    def load(self, split: str, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> CaptionDataset:
        """The examples of ``split`` (one of ``SPLITS``). Splits of one seed never share an image.
        Fail with ``DataError`` naming the source when it cannot be read: never return an empty
        dataset in place of a missing one."""


SPEC_BASES: dict[str, type[PluginSpec]] = {
    "encoder": EncoderSpec,
    "decoder": DecoderSpec,
    "dataset": DatasetSpec,
}


def check_spec(spec: object, kind: str) -> PluginSpec:
    """Validate a spec object handed to ``register``; raise ``PluginError`` explaining what is wrong."""
    base = SPEC_BASES[kind]
    if isinstance(spec, type):
        raise PluginError(f"register an instance, not the class: register({spec.__name__}())")
    if not isinstance(spec, base):
        raise PluginError(f"{type(spec).__name__} is not a {base.__name__} (registered as a {kind})")
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(
            f"{type(spec).__name__}.name must be an exact lowercase name like 'my-decoder', got {name!r}"
        )
    for attr in ("model_types", "lora_targets", "layer_classes") if kind == "decoder" else ():
        value = getattr(spec, attr, ())  # the trap: ("gemma2") is a str, and "in" matches "gemma" in it
        lists = value.values() if attr == "lora_targets" and isinstance(value, Mapping) else [value]
        if not all(isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v) for v in lists):
            raise PluginError(f"{type(spec).__name__}.{attr} must be a tuple of names, got {value!r}")
    if not isinstance(layer := getattr(spec, "layer_class", None), (str, type(None))):
        raise PluginError(f"{type(spec).__name__}.layer_class must be a class name, got {layer!r}")
    return spec
