"""The machinery every vision-encoder plugin shares; knows no model family by name.

A plugin's ``load`` hands ``VisionEncoderModule`` a backbone plus three family-specific pieces
(how pixels become tokens, how images become pixels, a JSON description of everything besides
the weights that decides the features) and gets the ``VisionEncoder`` contract for free:
freezing, input checks, ``layers()`` and the feature-cache ``fingerprint()``.

This module imports torch. Spec modules import it inside ``load`` so that ``vlmkit plugins list``
stays torch-free.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.core.contracts import RESAMPLE, image_size_problem
from vlmkit.core.errors import DataError, PluginError
from vlmkit.core.projection import adaptive_avg_pool  # plugins too: pools with ops every device has

if TYPE_CHECKING:  # pragma: no cover - typing only
    import PIL.Image

TokensFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``(backbone, pixel_values [B, 3, H, W]) -> features [B, N, Dv]``."""

PreprocessFn = Callable[[Sequence["PIL.Image.Image"]], torch.Tensor]
"""``(RGB PIL images) -> pixel_values [B, 3, H, W]``."""


class VisionEncoderModule(nn.Module):
    """A backbone wrapped to the ``vlmkit.VisionEncoder`` contract, returned frozen.

    Args:
        backbone: the pretrained network; registered as ``self.backbone`` so ``state_dict``,
            ``.to()`` and optimisers see it.
        tokens: module-level function ``(backbone, pixel_values) -> [B, N, Dv]`` (a function, not
            a closure, so the module stays picklable and deep-copyable).
        preprocess: RGB PIL images -> ``[B, 3, H, W]``, exactly as the checkpoint expects.
        blocks: the backbone's blocks in order (``layers()``), for unfreezing the last N.
        grid: ``(rows, cols)`` of the tokens, row-major, or ``None`` with ``num_tokens`` given.
        feature_dim, input_size: ``Dv`` and the ``(H, W)`` that ``preprocess`` produces.
        checkpoint, revision: what was loaded, for the model manifest.
        image_processing: the preprocessing as data (``VisionEncoder.image_processing``; build it
            with ``hf_image_processing``, ``torchvision_image_processing`` or
            ``resize_normalize_processing``), or ``None`` when the schema cannot describe it
            (the ONNX and browser exports then refuse this encoder).
        identity: JSON-able description of everything except the weights that decides the
            features (architecture config, preprocessing, which layer/tokens are taken). It goes
            into ``fingerprint()`` with a digest of the weights; the checkpoint string does not,
            so a moved or re-downloaded copy of the same weights keeps its cached features.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        tokens: TokensFn,
        preprocess: PreprocessFn,
        blocks: Sequence[nn.Module],
        grid: tuple[int, int] | None,
        feature_dim: int,
        input_size: tuple[int, int],
        checkpoint: str,
        revision: str | None,
        identity: Mapping[str, Any],
        image_processing: Mapping[str, Any] | None,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if grid is None and num_tokens is None:
            raise ValueError("give grid or num_tokens")
        self.backbone = backbone
        self.num_tokens = int(num_tokens if num_tokens is not None else grid[0] * grid[1])
        self.feature_dim = int(feature_dim)
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.input_size = (int(input_size[0]), int(input_size[1]))
        # The contract's image_size is one int; for the rare non-square input it is the height.
        self.image_size = self.input_size[0]
        self.checkpoint = checkpoint
        self.revision = revision
        self._tokens = tokens
        self._preprocess = preprocess
        self.image_processing = (
            {**image_processing, "input_size": list(self.input_size)}
            if image_processing is not None
            else None
        )
        self._blocks = tuple(blocks)  # references into self.backbone, not extra parameters
        self._identity = json.loads(canonical_json(identity))
        self._digest_cache: tuple[tuple, str] | None = None
        self.freeze()

    def freeze(self) -> VisionEncoderModule:
        """Stop gradients and switch to eval mode (dropout off, batch-norm statistics fixed)."""
        self.requires_grad_(False)
        return self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.input_size:
            raise ValueError(
                f"expected pixel values [B, 3, {self.input_size[0]}, {self.input_size[1]}], got "
                f"{list(pixel_values.shape)}; make them with encoder.preprocess(images)"
            )
        param = next(self.backbone.parameters(), None)
        if param is not None:  # follow the backbone after .to(device/dtype)
            pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        return self._tokens(self.backbone, pixel_values)

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        resize = (self.image_processing or {}).get("resize")
        for i, img in enumerate(images):  # images handed in directly skip the loader's checks
            if problem := image_size_problem(img.width, img.height, resize):
                raise DataError(f"image {i} of the batch {problem}")
        images = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        if not images:
            return torch.empty(0, 3, *self.input_size)
        return self._preprocess(images)

    def layers(self) -> list[nn.Module]:
        return list(self._blocks)

    def fingerprint(self) -> str:
        """sha256 of the weights digest, the revision and ``identity`` (preprocessing included).

        The weights digest is that of the weights as loaded, whatever dtype or device they were
        moved to since (``.to(torch.bfloat16)``, ``.cuda()``): a model trained with its encoder in
        bf16 has the encoder it would have in fp32. It is cached and recomputed only when a tensor
        is changed in place (an optimiser step on unfrozen layers, ``load_state_dict``), tracked
        by tensor version counters. Writes through ``param.data`` bypass those counters: use
        ``torch.no_grad()``.
        """
        payload = {"identity": self._identity, "revision": self.revision, "weights": self._weights_digest()}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()

    def _weights_digest(self) -> str:
        key = self._state_key()
        if key is not None and self._digest_cache is not None and self._digest_cache[0] == key:
            return self._digest_cache[1]
        digest = weights_digest(self.backbone.state_dict())
        self._digest_cache = (key, digest) if key is not None else None
        return digest

    def _state_key(self) -> tuple | None:
        """What identifies the current tensors; ``None`` for inference-mode tensors (no version)."""
        try:
            return tuple(
                (n, t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                for n, t in self.backbone.state_dict(keep_vars=True).items()
            )
        except RuntimeError:
            return None

    def _apply(self, fn, recurse=True):
        # ``.to(dtype)``, ``.half()``, ``.cuda()`` all come here: the moved weights are the same
        # weights, so they keep the digest taken before the move (hashing after a cast to bf16
        # would give a bf16-trained model another encoder than its fp32 self)
        digest = self._weights_digest()
        out = super()._apply(fn, recurse)
        key = self._state_key()
        self._digest_cache = (key, digest) if key is not None else None
        return out

    def extra_repr(self) -> str:
        return (
            f"checkpoint={self.checkpoint!r}, num_tokens={self.num_tokens}, feature_dim={self.feature_dim}, "
            f"grid={self.grid}, image_size={self.image_size}"
        )


def colour_histogram(
    pixel_values: torch.Tensor,
    *,
    grid: tuple[int, int],
    bins: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The colours under each token: ``[B, 3, H, W]`` normalised pixels -> ``[B, rows*cols, bins**3]``.

    Each pixel (back in ``[0, 1]`` RGB through ``mean``/``std``) votes into a ``bins`` x ``bins`` x
    ``bins`` RGB cube with linear weights between the two nearest bin centres of each channel
    (soft, so a colour between centres moves the histogram smoothly); the votes are averaged over
    the pixels under each of the ``grid`` cells and square-rooted (Hellinger scaling: a small object
    in a cell still shows). No parameters, and the same for every shape: what it says about colour
    cannot be fused with shape, which deep features do (``benchmarks/QUALITY.md``).
    """
    rgb = pixel_values.float() * pixel_values.new_tensor(std).float().view(1, 3, 1, 1)
    rgb = (rgb + pixel_values.new_tensor(mean).float().view(1, 3, 1, 1)).clamp(0.0, 1.0)
    fine = (grid[0] * 8, grid[1] * 8)  # votes over 8x8 sub-cells, not every pixel: the cube is big
    rgb = adaptive_avg_pool(rgb, fine) if tuple(rgb.shape[-2:]) != fine else rgb
    centres = torch.arange(bins, device=rgb.device, dtype=rgb.dtype).view(1, 1, bins, 1, 1)
    votes = (1.0 - (rgb.unsqueeze(2) * (bins - 1) - centres).abs()).clamp_min(0.0)  # [B, 3, bins, h, w]
    r, g, b = votes.unbind(1)
    cube = r[:, :, None, None] * g[:, None, :, None] * b[:, None, None, :]  # [B, bins, bins, bins, h, w]
    cells = adaptive_avg_pool(cube.flatten(1, 3), grid)  # [B, bins**3, rows, cols]
    return cells.clamp_min(0.0).sqrt().flatten(2).transpose(1, 2).to(pixel_values.dtype)


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        # Hash raw bytes via a uint8 view: numpy has no bfloat16, but every dtype has bytes.
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """Deterministic JSON for hashing: sorted keys, enums as values, tuples as lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return value.tolist()
    return str(value)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (library messages are often multi-line tables)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------- checkpoint locations


def local_checkpoint(checkpoint: str) -> Path | None:
    """The folder ``checkpoint`` names on this machine, or ``None`` for a hub id.

    Raises ``PluginError`` for something that is clearly a path (``/``, ``./``, ``~``) but does
    not exist, rather than letting a hub client try it as a repo id.
    """
    path = Path(checkpoint).expanduser()
    if path.exists():
        return path.resolve()
    if checkpoint.startswith(("/", "./", "../", "~", ".\\")) or checkpoint.count("/") > 1:
        raise PluginError(f"checkpoint {checkpoint!r} does not exist")
    return None


# --------------------------------------------------------------------- Hugging Face transformers


def hf_config(checkpoint: str, revision: str | None, *, accepted: Sequence[str], family: str):
    """The checkpoint's config, refused with one line unless its ``model_type`` is in ``accepted``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint, revision=revision)
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"cannot read {family} checkpoint {checkpoint!r}: {one_line(exc)}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in accepted:
        raise PluginError(
            f"checkpoint {checkpoint!r} has model_type {model_type!r}; the {family} encoder accepts "
            f"{', '.join(accepted)}"
        )
    return config


def hf_config_identity(config: Any) -> dict[str, Any]:
    """A config as data for the fingerprint, without fields that name files or versions."""
    volatile = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in volatile}


def load_hf_model(model_class: Any, checkpoint: str, *, revision: str | None, config: Any, family: str):
    """``model_class.from_pretrained`` in float32; every weight the model needs must be present
    with its shape.

    Unexpected weights are fine (a full CLIP/SigLIP checkpoint also holds the text tower we
    drop); missing or mis-shaped ones are not, since they would silently stay random. We check
    them ourselves (``ignore_mismatched_sizes`` only turns transformers' error into data), so the
    error names the tensor and both shapes in one line.
    """
    try:
        with _quiet_loading_report():
            model, info = model_class.from_pretrained(
                checkpoint,
                revision=revision,
                config=config,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except Exception as exc:  # noqa: BLE001 - any failure to load means this checkpoint is unusable
        raise PluginError(f"cannot load {family} weights from {checkpoint!r}: {one_line(exc)}") from exc
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: str(item[0]))
    if mismatched:
        name, stored, expected = mismatched[0]
        raise PluginError(
            f"checkpoint {checkpoint!r}: size mismatch for {name}: stored {list(stored)}, its config asks for "
            f"{list(expected)} ({len(mismatched)} tensor(s) differ)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise PluginError(
            f"checkpoint {checkpoint!r} lacks {len(missing)} {family} weight(s) (e.g. {missing[0]}); "
            f"is it a {family} vision checkpoint?"
        )
    return model


@contextmanager
def _quiet_loading_report() -> Iterator[None]:
    # transformers logs a many-line table of unexpected keys (the text tower of a full
    # checkpoint, which we drop on purpose); load_hf_model checks missing keys itself. A filter,
    # not a logger level: transformers runs extra checks when that logger's level is raised.
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def hf_image_processor(checkpoint: str, revision: str | None, *, default: Callable[[], Any], family: str):
    """The checkpoint's own image processor; ``default()`` (the family's published settings)
    when the checkpoint has no ``preprocessor_config.json``, as vision-only exports often do."""
    from transformers import AutoImageProcessor

    local = local_checkpoint(checkpoint)
    if local is not None and not (local / "preprocessor_config.json").is_file():
        processor = None
    else:
        try:
            processor = AutoImageProcessor.from_pretrained(checkpoint, revision=revision)
        except OSError:
            processor = None
    if processor is None:
        processor = default()
        logging.getLogger(__name__).warning(
            "%s checkpoint %r has no image processor config; using %s defaults", family, checkpoint, family
        )
    return processor


def hf_preprocess(processor: Any, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """Pixel values from a transformers image processor."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def hf_fixed_size_preprocess(processor: Any, checkpoint: str, image_size: int) -> PreprocessFn:
    """``hf_preprocess`` bound to ``processor``, checked to make the square images the model
    was built for (a mismatch means a broken checkpoint, better caught at load than mid-run)."""
    preprocess = partial(hf_preprocess, processor)
    size = preprocessed_size(preprocess)
    if size != (image_size, image_size):
        raise PluginError(
            f"checkpoint {checkpoint!r}: its image processor makes {size[0]}x{size[1]} images but the model "
            f"expects {image_size}x{image_size}"
        )
    return preprocess


def preprocessed_size(preprocess: PreprocessFn) -> tuple[int, int]:
    """The ``(H, W)`` that ``preprocess`` produces, found by running it on one small blank image."""
    from PIL import Image

    pixels = preprocess([Image.new("RGB", (40, 30))])
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def hf_processor_identity(processor: Any) -> dict[str, Any]:
    # The class matters too: the PIL and torchvision back ends resample slightly differently.
    return {"class": type(processor).__name__, **processor.to_dict()}


def resize_normalize(
    images: Sequence[PIL.Image.Image],
    *,
    size: tuple[int, int],
    resample: int,
    rescale_factor: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize to exactly ``size`` (H, W) with PIL, rescale, normalise: ``[B, 3, H, W]``."""
    import numpy as np

    arrays = [
        np.asarray(img.resize((size[1], size[0]), resample=resample), dtype=np.float32) for img in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * rescale_factor
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """``encoder.layers`` of a transformers vision model (v5 layout, or v4's ``vision_model``)."""
    tower = getattr(model, "vision_model", model)
    return list(tower.encoder.layers)


# ------------------------------------------------------------------ declared preprocessing


def hf_image_processing(processor: Any) -> dict[str, Any] | None:
    """A transformers image processor's steps as declared preprocessing (``VisionEncoder.image_processing``);
    ``None`` when it does something the schema cannot say (padding, other size rules)."""
    p = processor
    if getattr(p, "do_pad", False):
        return None
    backend = getattr(p, "backend", None)
    if backend is None:  # transformers 4.x: "Fast" processors run on torchvision
        backend = "torchvision" if type(p).__name__.endswith("Fast") else "pil"
    resize = None
    if getattr(p, "do_resize", False):
        size = {k: v for k, v in dict(p.size).items() if v is not None}
        if set(size) == {"height", "width"}:
            size = {"height": int(size["height"]), "width": int(size["width"])}
        elif set(size) == {"shortest_edge"}:
            size = {"shortest_edge": int(size["shortest_edge"])}
        else:
            return None
        resample = resample_name(p.resample if p.resample is not None else 2)
        resize = {"size": size, "resample": resample, "backend": backend}
    crop = None
    if getattr(p, "do_center_crop", False):
        c = dict(p.crop_size)
        crop = {"height": int(c["height"]), "width": int(c["width"]), "rounding": "floor"}
    return {
        "resize": resize,
        "center_crop": crop,
        "rescale_factor": float(p.rescale_factor) if p.do_rescale else 1.0,
        "mean": [float(v) for v in p.image_mean] if p.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(v) for v in p.image_std] if p.do_normalize else [1.0, 1.0, 1.0],
    }


def torchvision_image_processing(compose: Any) -> dict[str, Any] | None:
    """A torchvision ``Compose`` (timm's evaluation transform) as declared preprocessing; ``None``
    when it holds a step the schema cannot say."""
    spec: dict[str, Any] = {"resize": None, "center_crop": None, "rescale_factor": 1.0}
    for t in compose.transforms:
        kind = type(t).__name__
        if kind == "Resize":
            if getattr(t, "max_size", None) is not None:
                return None
            size = t.size
            if isinstance(size, int) or len(size) == 1:
                size = {"shortest_edge": int(size if isinstance(size, int) else size[0])}
            else:
                size = {"height": int(size[0]), "width": int(size[1])}
            resample = getattr(t.interpolation, "value", t.interpolation)
            spec["resize"] = {"size": size, "resample": resample_name(resample), "backend": "pil"}
        elif kind == "CenterCrop":
            h, w = t.size if len(t.size) == 2 else (t.size[0], t.size[0])
            spec["center_crop"] = {"height": int(h), "width": int(w), "rounding": "round"}
        elif kind in ("ToTensor", "MaybeToTensor", "PILToTensor+ToDtype"):
            spec["rescale_factor"] = 1.0 / 255.0
        elif kind == "Normalize":
            spec["mean"] = [float(v) for v in t.mean]
            spec["std"] = [float(v) for v in t.std]
        else:
            return None
    spec.setdefault("mean", [0.0, 0.0, 0.0])
    spec.setdefault("std", [1.0, 1.0, 1.0])
    return spec


def resample_name(value: Any) -> str:
    if isinstance(value, str):
        return value.lower()
    by_number = {v: k for k, v in RESAMPLE.items()}
    number = int(getattr(value, "value", value))
    if number not in by_number:
        raise PluginError(f"unknown resampling filter {value!r}")
    return by_number[number]


def resize_normalize_processing(
    *,
    size: tuple[int, int],
    resample: int,
    rescale_factor: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """What ``resize_normalize`` with these arguments does, as declared preprocessing."""
    height, width = size
    return {
        "resize": {
            "size": {"height": int(height), "width": int(width)},
            "resample": resample_name(resample),
            "backend": "pil",
        },
        "center_crop": None,
        "rescale_factor": float(rescale_factor),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
