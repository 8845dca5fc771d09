"""The plugin contract suite: what every encoder, decoder and dataset plugin must do.

vlmkit runs it on every built-in plugin; a plugin author runs the same functions on theirs::

    from vlmkit.testing import check_decoder, tiny_decoder_checkpoint

    def test_my_decoder_contract(tmp_path):
        check_decoder(MyDecoder(), tiny_decoder_checkpoint("llama", tmp_path / "llama"), tmp_path)

Each ``check_*`` function raises ``AssertionError`` with a message saying which promise broke,
and returns a small report (dict) of what it measured.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from vlmkit.core.contracts import SPLITS, DatasetSpec, DecoderSpec, EncoderSpec, VisionEncoder
from vlmkit.core.hookspecs import hookimpl
from vlmkit.core.registry import Registry
from vlmkit.sdk.decoders import TransformersDecoderSpec

CAPTIONS = ["A red circle on the left.", "Two dogs play in the snow near a small wooden house."]
PROMPT = "Describe the image."


# ------------------------------------------------------------------------------- a toy encoder


class ToyEncoderSpec(EncoderSpec):
    """A tiny deterministic convolutional encoder (4x4 grid of 16-dim tokens) for decoder tests."""

    name = "vlmkit-toy"
    description = "tiny deterministic conv encoder for tests (vlmkit.testing)"
    default_checkpoint = "toy"

    def load(self, checkpoint: str | None = None, *, revision: str | None = None) -> VisionEncoder:
        import numpy as np
        import torch
        from torch import nn

        class ToyEncoder(nn.Module):
            num_tokens, feature_dim, grid, image_size = 16, 16, (4, 4), 32
            # what ``preprocess`` does, as data: x / 127.5 - 1 after a bicubic resize to 32x32
            image_processing = {
                "input_size": [32, 32],
                "resize": {"size": {"height": 32, "width": 32}, "resample": "bicubic", "backend": "pil"},
                "center_crop": None,
                "rescale_factor": 1 / 127.5,
                "mean": [1.0, 1.0, 1.0],
                "std": [1.0, 1.0, 1.0],
            }

            def __init__(self) -> None:
                super().__init__()
                generator = torch.Generator().manual_seed(0)
                self.conv = nn.Conv2d(3, 16, 8, 8)
                with torch.no_grad():
                    for p in self.conv.parameters():
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
                self.requires_grad_(False)
                self.eval()

            def preprocess(self, images):
                arrays = [
                    np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32) / 127.5 - 1
                    for im in images
                ]
                return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

            def forward(self, pixel_values):
                return self.conv(pixel_values).flatten(2).transpose(1, 2)

            def fingerprint(self) -> str:
                return "vlmkit-toy-v1-32px"

            def layers(self):
                return [self.conv]

        return ToyEncoder()


def make_registry(*specs) -> Registry:
    """A fresh registry holding ``specs`` (encoders, decoders and datasets, by their kind)."""

    class _Plugin:
        @hookimpl
        def register_encoders(self, register):
            for s in specs:
                if isinstance(s, EncoderSpec):
                    register(s)

        @hookimpl
        def register_decoders(self, register):
            for s in specs:
                if isinstance(s, DecoderSpec):
                    register(s)

        @hookimpl
        def register_datasets(self, register):
            for s in specs:
                if isinstance(s, DatasetSpec):
                    register(s)

    registry = Registry()
    registry.add_plugin(_Plugin(), name="vlmkit-testing")
    if registry.broken:
        raise AssertionError(f"specs failed to register: {registry.broken[0].error}")
    return registry


def registry_of(plugin, name: str | None = None) -> Registry:
    """A fresh registry holding what ``plugin`` (your plugin module, as an entry point names it)
    registers through the hooks; ``AssertionError`` with the reason when it fails to register."""
    registry = Registry()
    registry.add_plugin(plugin, name=name or getattr(plugin, "__name__", None))
    if registry.broken:
        raise AssertionError(
            f"plugin {registry.broken[0].provider.plugin} failed: {registry.broken[0].error}"
        )
    return registry


def sample_images(n: int = 2):
    """``n`` small, distinct RGB PIL images."""
    from PIL import Image, ImageDraw

    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    images = []
    for i in range(n):
        img = Image.new("RGB", (48 + 8 * i, 40), "white")
        ImageDraw.Draw(img).ellipse((4 + 3 * i, 4, 30 + 3 * i, 30), fill=colours[i % len(colours)])
        images.append(img)
    return images


# ------------------------------------------------------------------------------- encoders


def check_encoder(
    spec: EncoderSpec, checkpoint: str | None, tmp_path: str | Path | None = None, *, onnx: bool = True
) -> dict[str, Any]:
    """An encoder plugin loads ``checkpoint`` frozen, preprocesses any RGB image to one shape,
    returns ``[B, num_tokens, feature_dim]`` features whose grid matches, has a stable
    fingerprint, and names its layers; ``check_encoder_runtime`` (its preprocessing declared as
    data, and with ``onnx`` its ONNX graph, equal to PyTorch's). Given ``tmp_path``, also
    ``check_encoder_round_trip``."""
    import torch

    encoder = spec.load(checkpoint)
    assert isinstance(encoder, torch.nn.Module), f"{spec.name}.load must return a torch.nn.Module"
    for attr in ("num_tokens", "feature_dim", "grid", "preprocess", "fingerprint", "layers"):
        assert hasattr(encoder, attr), f"{spec.name} encoder lacks {attr!r} (see vlmkit.VisionEncoder)"
    assert not any(p.requires_grad for p in encoder.parameters()), f"{spec.name} encoder must load frozen"
    images = sample_images(2)
    pixels = encoder.preprocess(images)
    assert pixels.ndim == 4 and pixels.shape[:2] == (2, 3), (
        f"preprocess gave {tuple(pixels.shape)}, want [2,3,H,W]"
    )
    with torch.no_grad():
        feats = encoder(pixels)
    want = (2, encoder.num_tokens, encoder.feature_dim)
    assert tuple(feats.shape) == want, f"{spec.name} features {tuple(feats.shape)} != {want}"
    assert torch.isfinite(feats).all(), f"{spec.name} features are not finite"
    if encoder.grid is not None:
        assert math.prod(encoder.grid) == encoder.num_tokens, (
            f"grid {encoder.grid} != {encoder.num_tokens} tokens"
        )
    fp = encoder.fingerprint()
    assert isinstance(fp, str) and fp, "fingerprint must be a non-empty string"
    assert spec.load(checkpoint).fingerprint() == fp, "fingerprint must be stable across loads"
    # precision is a property of a run: a model trained with its encoder in bf16 must find the
    # same encoder when it loads in fp32 (vlmkit's VisionEncoderModule keeps the digest of the
    # weights as loaded across .to(); an encoder of its own must do the same)
    cast = spec.load(checkpoint).to(torch.bfloat16)
    assert cast.fingerprint() == fp, (
        f"{spec.name}: fingerprint changes when the encoder is cast to bfloat16; it must name the "
        "weights as loaded, not the dtype they run in (load would warn 'encoder differs')"
    )
    assert len(list(encoder.layers())) > 0, "layers() must list the encoder blocks"
    report = {"num_tokens": encoder.num_tokens, "feature_dim": encoder.feature_dim, "fingerprint": fp}
    report["runtime"] = check_encoder_runtime(spec, checkpoint, tmp_path, onnx=onnx, encoder=encoder)
    if tmp_path is not None:
        report["round_trip"] = check_encoder_round_trip(spec, checkpoint, tmp_path)
    return report


def awkward_images() -> dict[str, Any]:
    """Images a runtime must preprocess exactly as the encoder does, by name: wide, tall, tiny
    (smaller than any crop), greyscale, RGBA (alpha to drop) and palette, of deterministic noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(h: int, w: int, channels: int = 3):
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)

    return {
        "wide": Image.fromarray(noise(37, 121)),
        "tall": Image.fromarray(noise(150, 41)),
        "tiny": Image.fromarray(noise(3, 5)),
        "greyscale": Image.fromarray(noise(64, 48, 1)[..., 0], "L"),
        "rgba": Image.fromarray(noise(45, 45, 4), "RGBA"),
        "palette": Image.fromarray(noise(30, 70)).convert("P"),
    }


#: how far the runtimes' preprocessing may be from the encoder's (pixel values), as at export
PREPROCESSING_TOLERANCE = 1e-4


def check_encoder_runtime(
    spec: EncoderSpec,
    checkpoint: str | None,
    tmp_path: str | Path | None = None,
    *,
    onnx: bool = True,
    encoder: VisionEncoder | None = None,
) -> dict[str, Any]:
    """The encoder's preprocessing declared as data (``VisionEncoder.image_processing``) is what
    it does: the torch-free runtimes' numpy preprocessing (ONNX, and the browser's port of it)
    run from the declaration gives the pixels ``preprocess`` gives, on ``awkward_images`` passed
    as they are (a user's ``vlm.generate(images)`` does not convert them either). With ``onnx``,
    the encoder exported as an ONNX graph computes PyTorch's features on those pixels."""
    from vlmkit.core.errors import VlmkitError

    try:
        return _check_encoder_runtime(spec, checkpoint, tmp_path, onnx, encoder)
    except VlmkitError as exc:
        raise AssertionError(f"encoder {spec.name!r}: {type(exc).__name__}: {exc}") from exc


def _check_encoder_runtime(spec, checkpoint, tmp_path, onnx, encoder) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import torch

    from vlmkit.export.onnx import describe_preprocessing
    from vlmkit.runtime.onnx import preprocess_images

    encoder = encoder if encoder is not None else spec.load(checkpoint)
    assert getattr(encoder, "image_processing", None) is not None, (
        f"{spec.name}: the encoder declares no image_processing, so the ONNX and browser runtimes "
        "cannot preprocess for it; declare it (see vlmkit.VisionEncoder.image_processing)"
    )
    declared = describe_preprocessing(encoder)
    worst, pixels = 0.0, []
    for name, image in awkward_images().items():
        want = encoder.preprocess([image]).float()
        got = preprocess_images([image], declared)
        what = f"{spec.name}: on the {name} image ({image.width}x{image.height}, {image.mode})"
        assert got.shape == tuple(want.shape), (
            f"{what} the declared image_processing makes {got.shape[1:]} pixels, preprocess "
            f"{tuple(want.shape[1:])}"
        )
        diff = float(np.abs(got - want.numpy()).max())
        assert diff <= PREPROCESSING_TOLERANCE, (
            f"{what} the declared image_processing gives pixels up to {diff:.3g} away from preprocess's: "
            "the ONNX and browser runtimes would see another image; make it describe preprocess exactly"
        )
        worst = max(worst, diff)
        pixels.append(want)
    report: dict[str, Any] = {"preprocessing_max_abs_diff": worst}
    if onnx:
        try:
            import onnxruntime  # noqa: F401

            from vlmkit.export import DEFAULT_OPSET
            from vlmkit.export.onnx import VisionGraph, check_vision_graph, export_vision_graph
        except ImportError as exc:
            raise AssertionError(f"the ONNX check needs vlmkit[onnx] ({exc}); or pass onnx=False") from exc
        vision = VisionGraph(encoder, torch.nn.Identity()).eval()
        batch = torch.cat(pixels)
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            path = Path(folder) / f"{spec.name}-encoder.onnx"
            export_vision_graph(vision, batch[:2], path, opset=DEFAULT_OPSET)
            report["onnx_max_rel_diff"] = check_vision_graph(path, vision, batch)
    return report


class ToyDecoderSpec(TransformersDecoderSpec):
    """A tiny Llama decoder (``tiny_decoder_checkpoint("llama")``) to pair with an encoder."""

    name = "vlmkit-toy-llama"
    description = "tiny random Llama for encoder tests (vlmkit.testing)"
    model_types = ("llama",)
    lora_targets = ("q_proj", "v_proj")
    layer_class = "LlamaDecoderLayer"


def check_encoder_round_trip(
    spec: EncoderSpec, checkpoint: str | None, tmp_path: str | Path, *, unfreeze: int = 2, steps: int = 3
) -> dict[str, Any]:
    """With its last ``unfreeze`` blocks trained (``unfreeze_encoder_layers``), the encoder in a
    saved and reloaded model computes exactly what the trained one did.

    Trains a few steps (a tiny Llama decoder), and checks: frozen blocks stay in eval mode and
    keep every parameter and buffer (batch-norm statistics) unchanged; the unfrozen blocks
    train; after ``save`` and ``load`` the encoder's whole state, its features, its fingerprint
    (no "encoder differs" warning) and the captions equal the trained model's.
    """
    import torch

    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint

    tmp_path = Path(tmp_path)
    decoder = ToyDecoderSpec()
    registry = make_registry(spec, decoder)
    blocks = len(list(spec.load(checkpoint).layers()))
    unfreeze = min(unfreeze, blocks)
    config = {
        "encoder": spec.name,
        "encoder_checkpoint": checkpoint,
        "decoder": decoder.name,
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", tmp_path / f"{spec.name}-round-trip-lm"),
        "projection": {"type": "linear", "reduction": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "unfreeze_encoder_layers": unfreeze,
        "max_caption_tokens": 6,
    }
    vlm = PrefixConditioningVLM.build(config, registry=registry)
    layers = list(vlm.encoder.layers())
    frozen_ids = {id(t) for layer in layers[:-unfreeze] for t in (*layer.parameters(), *layer.buffers())}
    before = {k: v.detach().clone() for k, v in vlm.encoder.state_dict(keep_vars=True).items()}
    frozen_names = {k for k, v in vlm.encoder.state_dict(keep_vars=True).items() if id(v) in frozen_ids}
    registered = set(vlm.encoder.modules())
    images = sample_images(2)
    pixels = vlm.preprocess(images)
    batch = vlm.tokenize(CAPTIONS)
    groups = vlm.trainable_parameter_groups()
    assert groups["encoder"], (
        f"{spec.name}: unfreeze_encoder_layers={unfreeze} made no encoder weight trainable"
    )
    optimizer = torch.optim.AdamW([p for g in groups.values() for p in g], lr=1e-2)
    for _ in range(steps):
        vlm.train()
        training = [
            m for layer in layers[:-unfreeze] for m in layer.modules() if m in registered and m.training
        ]
        assert not training, (
            f"{spec.name}: frozen encoder blocks are in train mode ({type(training[0]).__name__})"
        )
        loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.eval()
    after = vlm.encoder.state_dict()
    moved = [k for k in frozen_names if not torch.equal(before[k], after[k])]
    assert not moved, f"{spec.name}: training changed frozen encoder state: {sorted(moved)[:3]}"
    trained = [k for k in before if k not in frozen_names and not torch.equal(before[k], after[k])]
    assert trained, f"{spec.name}: the unfrozen encoder blocks did not change in training"

    reloaded = PrefixConditioningVLM.load(vlm.save(tmp_path / f"{spec.name}-round-trip"), registry=registry)
    differ = [k for k, v in reloaded.encoder.state_dict().items() if not torch.equal(v, after[k])]
    assert not differ, (
        f"{spec.name}: the reloaded encoder differs from the trained one in {sorted(differ)[:3]}"
    )
    assert reloaded.encoder.fingerprint() == vlm.encoder.fingerprint(), (
        f"{spec.name}: the reloaded encoder's fingerprint differs (load would warn 'encoder differs')"
    )
    with torch.no_grad():
        assert torch.equal(reloaded.encode(pixels), vlm.encode(pixels)), (
            f"{spec.name}: features differ after reload"
        )
    captions = vlm.generate(pixel_values=pixels, return_ids=True)
    assert reloaded.generate(pixel_values=pixels, return_ids=True) == captions, (
        f"{spec.name}: captions differ after reload"
    )
    return {"unfrozen": unfreeze, "trained_tensors": len(trained)}


# ------------------------------------------------------------------------------- decoders


class CheckFailed(AssertionError):
    """A ``check_*`` failure, its message naming the plugin and the check."""


class _Checks:
    """Runs named checks of one plugin: any failure in one, an assertion or an exception of
    vlmkit, peft or transformers, is one ``CheckFailed`` (an ``AssertionError``) naming the
    plugin and the check."""

    def __init__(self, subject: str) -> None:
        self.subject = subject

    @contextlib.contextmanager
    def __call__(self, check: str):
        try:
            yield
        except CheckFailed:  # a check inside this one: already named
            raise
        except AssertionError as exc:
            raise CheckFailed(f"{self.subject}, check {check!r}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - whatever a plugin's load or transformers raises
            reason = " ".join(str(exc).split()) or "(no message)"
            raise CheckFailed(f"{self.subject}, check {check!r}: {type(exc).__name__}: {reason}") from exc


def check_decoder(
    spec: DecoderSpec,
    checkpoint: str | None,
    tmp_path: str | Path,
    *,
    styles: tuple[str, ...] = ("auto", "plain"),
    encoder: EncoderSpec | None = None,
    encoder_checkpoint: str | None = None,
    onnx: bool = True,
    seed: int = 0,
    attempts: int = 5,
) -> dict[str, Any]:
    """A decoder plugin: loads, refuses nothing it declares, resolves LoRA targets, formats so
    that generation sees exactly the training context, masks labels exactly on caption + end
    token for each style, trains a step that moves every trainable tensor, computes the same loss
    on caption positions as on full logits (at realistic logit magnitudes), gives the model's own
    logits for a caption given as token ids, generates (batched = one by one), round-trips
    save/load (from another folder and working directory) and, with ``onnx``, exports to ONNX
    and captions with the torch-free runtime exactly as PyTorch does.

    For the generation checks LoRA and the projection get random weights (``seed``), so that
    captions depend on them; when a seed leaves a tiny random model captioning one token over and
    over (which would prove little), the next seed is tried, ``attempts`` seeds in all.

    Every failure is an ``AssertionError`` naming the plugin and the check (``decoder 'x', check
    'training step': ...``), whatever raised it."""
    checks = _Checks(f"decoder {spec.name!r}")
    return _check_decoder(
        spec, checkpoint, Path(tmp_path), styles, encoder, encoder_checkpoint, onnx, seed, attempts, checks
    )


def _check_decoder(
    spec, checkpoint, tmp_path, styles, encoder, encoder_checkpoint, onnx, seed, attempts, checks
) -> dict[str, Any]:
    from vlmkit.core.model import IGNORE_INDEX, PrefixConditioningVLM

    with checks("load"):
        report: dict[str, Any] = {"lora_targets": _check_loaded(spec, checkpoint, styles, checks)}

    # build a VLM around the decoder with a toy (or given) encoder
    encoder = encoder or ToyEncoderSpec()
    with checks("register"):
        registry = make_registry(encoder, spec)
    config = {
        "encoder": encoder.name,
        "encoder_checkpoint": encoder_checkpoint,
        "decoder": spec.name,
        "decoder_checkpoint": checkpoint,
        "projection": {"type": "mlp", "reduction": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "prompt": PROMPT,
    }
    vlm = None
    for style in styles:
        with checks("build"):
            styled = PrefixConditioningVLM.build({**config, "prompt_format": style}, registry=registry)
        with checks(f"label mask ({style})"):
            _check_label_mask(styled, IGNORE_INDEX)
        vlm = styled if style == "auto" else vlm  # the config's default format: the model checked on
    if vlm is None:
        with checks("build"):
            vlm = PrefixConditioningVLM.build(config, registry=registry)
    images = sample_images(3)
    with checks("tokenize"):
        pixels = vlm.preprocess(images)
        batch = vlm.tokenize(CAPTIONS + CAPTIONS[:1])
    with checks("training step"):
        report["loss"] = _check_training_step(vlm, batch, pixels)
    with checks("loss paths"):
        report["loss_paths"] = _check_loss_paths(vlm, batch, pixels)
    with checks("token ids"):
        report["token_ids_max_rel_diff"] = check_token_ids(vlm)

    with checks("generation"):
        report["seed"] = _randomise_until_varied(vlm, images, seed, attempts, required=onnx)
        captions = vlm.generate(images, max_new_tokens=8)
        assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
        features = vlm.encode(pixels[:2])
        prompts = [PROMPT, "A much longer prompt that forces left padding in a batch."]
        batched = vlm.generate(features=features, prompt=prompts, max_new_tokens=6, return_ids=True)
        single = [
            vlm.generate(features=features[i : i + 1], prompt=p, max_new_tokens=6, return_ids=True)[0]
            for i, p in enumerate(prompts)
        ]
        assert batched == single, f"batched (left-padded) generation {batched} != one by one {single}"
    with checks("round trip"):
        _check_round_trip(spec, vlm, registry, batch, pixels, images, tmp_path)
    if onnx:
        with checks("onnx"):
            report["onnx"] = check_onnx_parity(vlm, tmp_path / f"{spec.name}-onnx", images)
    report["captions"] = captions
    return report


def _check_loaded(spec: DecoderSpec, checkpoint, styles, checks) -> list[str]:
    """The loaded model and tokenizer, the LoRA targets, stop tokens and formatting."""
    model, tokenizer = spec.load(checkpoint)
    assert model.config.model_type in spec.model_types, (
        f"loaded a {model.config.model_type!r} model but declares {spec.model_types}"
    )
    assert tokenizer.pad_token_id is not None, "the tokenizer must have a pad token"
    targets = spec.resolve_lora_targets(model)
    names = {n for n, _ in model.named_modules()}
    assert targets, "resolved no LoRA targets"
    for t in targets:
        assert any(n == t or n.endswith("." + t) for n in names), f"LoRA target {t!r} is not a module"
    if hasattr(spec, "resolve_layer_class"):  # FSDP wraps these blocks: a misspelt name must fail
        layer = spec.resolve_layer_class(model)
        assert any(type(m).__name__ == layer for m in model.modules()), f"no {layer} block in the model"
    stops = spec.stop_token_ids(tokenizer)
    assert stops, "declares no stop tokens"
    with checks("formatting"):
        for style in styles:
            for caption in CAPTIONS:
                gen = spec.format(tokenizer, PROMPT, None, style)
                train = spec.format(tokenizer, PROMPT, caption, style)
                assert (gen.before, gen.after) == (train.before, train.after), (
                    f"style {style!r}: the generation context differs from the training one"
                )
                assert not gen.target, "format(caption=None) must have an empty target"
                assert train.target and train.target[-1] in spec.stop_token_ids(tokenizer, style), (
                    f"style {style!r}: target must end with a stop token"
                )
                text = tokenizer.decode(train.target, skip_special_tokens=True).strip()
                assert text == caption.strip(), (
                    f"style {style!r}: target decodes to {text!r}, not {caption!r}"
                )
    return targets


def _check_training_step(vlm, batch, pixels) -> float:
    """One optimizer step moves every trainable tensor; the ones it does not move are named (a
    LoRA target the forward bypasses, as Mamba's fast path does ``dt_proj``, trains nothing)."""
    import torch

    named = [(n, p) for n, p in vlm.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in named]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    vlm.train()
    loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    loss.backward()
    optimizer.step()
    still = [_short_name(n) for (n, p), b in zip(named, before, strict=True) if torch.equal(b, p.detach())]
    assert not still, (
        f"{len(still)} of {len(named)} trainable tensors did not change in a training step: {', '.join(still)} "
        "(a LoRA target the model's forward bypasses trains nothing: drop it from lora_targets)"
    )
    return float(loss.detach())


def _short_name(name: str) -> str:
    """``lm.base_model.model.backbone.layers.0.mixer.dt_proj.lora_A.default.weight`` ->
    ``backbone.layers.0.mixer.dt_proj.lora_A.default.weight``: the decoder's own module path."""
    return name.removeprefix("lm.base_model.model.")


#: the largest logit the loss check scales the LM head to (trained LMs reach 20-50; tiny random
#: ones ~0.1, where softcapping or logit scaling hardly changes a loss)
REALISTIC_LOGIT = 40.0


def _check_loss_paths(vlm, batch, pixels) -> dict[str, float]:
    """The training loss (LM head on caption positions only) equals the loss on the model's full
    logits, with the LM head scaled so that logits reach realistic magnitudes: a family whose
    output path does more than the head (softcapping, logit scaling) shows the difference."""
    import torch

    head = vlm.language_model.get_output_embeddings().weight
    saved = head.detach().clone()
    vlm.eval()  # no dropout: the two losses below must see the same network
    try:
        with torch.no_grad():
            logits = vlm(**batch.to_dict(), pixel_values=pixels, return_logits=True)["logits"]
            head.mul_(REALISTIC_LOGIT / max(float(logits.abs().max()), 1e-6))
            full_out = vlm(**batch.to_dict(), pixel_values=pixels, return_logits=True)
            full, peak = full_out["loss"], float(full_out["logits"].abs().max())
            fast = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert torch.allclose(full, fast, rtol=1e-4, atol=1e-4), (
        f"the training loss on caption positions ({float(fast):.6g}) differs from the loss "
        f"on the model's own logits ({float(full):.6g}; largest logit {peak:.3g}): the loss skips part of "
        "the model's output path"
    )
    return {"loss": float(full), "largest_logit": peak}


#: how far vlmkit's logits may be from the model's own on the same token ids (relative)
TOKEN_IDS_TOLERANCE = 1e-4


def check_token_ids(model, caption: str = CAPTIONS[1], *, prompt: str | None = None) -> float:
    """vlmkit embeds token ids as the LM itself does: for ``caption`` given as token ids (its
    prompt and caption, no image), the logits of the LM fed vlmkit's embeddings (``inputs_embeds``)
    equal those of the LM fed the ids. A family that transforms embeddings on its token-id path
    only (Falcon-H1 multiplies them by ``embedding_multiplier`` in its forward) fails here unless
    vlmkit carries that over. Returns the largest difference relative to the largest logit;
    ``AssertionError`` past ``TOKEN_IDS_TOLERANCE``."""
    import torch

    f = model.format(caption, prompt)
    ids = torch.tensor([[*f.before, *f.after, *f.target]], device=model.device)
    mask = torch.ones_like(ids)
    lm = model.language_model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            no_image = torch.zeros_like(ids, dtype=torch.bool)
            embeds = model.embed(ids, no_image, torch.zeros(0, lm.get_input_embeddings().embedding_dim))
            ours = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits.float()
            theirs = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    worst = float((ours - theirs).abs().max()) / max(float(theirs.abs().max()), 1e-6)
    assert worst <= TOKEN_IDS_TOLERANCE, (
        f"for a caption given as token ids, vlmkit's logits differ from the model's own by {worst:.3g} "
        f"(relative; tolerance {TOKEN_IDS_TOLERANCE}): the model transforms token embeddings on its token-id "
        "path in a way vlmkit's embeddings miss"
    )
    return worst


def _randomise(vlm, seed: int = 0) -> None:
    """LoRA starts as a no-op: give its B matrices and the projection random weights, so that
    captions depend on both and a mismatch between two runtimes shows."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vlm.lm.named_parameters():  # B ~ N(0, 1): weaker leaves tiny LMs' captions
            if "lora_A" in name or "lora_B" in name:  # one token repeated, whatever the image
                scale = p.shape[1] ** -0.5 if "lora_A" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        for p in vlm.projection.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    vlm.eval()


#: tokens generated per image to tell varied captions from degenerate ones (and to compare runtimes)
PARITY_TOKENS = 12


def _randomise_until_varied(vlm, images, seed: int, attempts: int, *, required: bool) -> int:
    """Randomise with ``seed``, then the next seeds, until some caption has two different tokens;
    the seed used. All degenerate: an ``AssertionError`` when ``required``, else the first seed."""
    tried = []
    for s in range(seed, seed + max(1, attempts)):
        _randomise(vlm, s)
        ids = vlm.generate(images, max_new_tokens=PARITY_TOKENS, return_ids=True)
        if max(len(set(row)) for row in ids) > 1:
            return s
        tried.append(ids)
    assert not required, (
        f"with randomised LoRA and projection (seeds {seed}..{seed + max(1, attempts) - 1}), PyTorch captions "
        f"are degenerate ({tried[-1]}): the ONNX comparison would prove little; pass check_decoder "
        "another seed= or more attempts="
    )
    _randomise(vlm, seed)
    return seed


def _check_round_trip(spec, vlm, registry, batch, pixels, images, tmp_path: Path) -> None:
    """Saved, moved to another folder and loaded from another working directory: same logits
    and captions."""
    import shutil

    import torch

    from vlmkit.core.model import PrefixConditioningVLM

    saved = vlm.save(tmp_path / f"{spec.name}-artifact")
    moved = shutil.move(str(saved), str(tmp_path / "moved" / saved.name))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    with contextlib.chdir(elsewhere):
        reloaded = PrefixConditioningVLM.load(moved, registry=registry)
    with torch.no_grad():
        a = vlm(**batch.to_dict(), pixel_values=pixels, return_logits=True)["logits"]
        b = reloaded(**batch.to_dict(), pixel_values=pixels, return_logits=True)["logits"]
    assert torch.allclose(a, b, atol=1e-5), "logits differ after save/load"
    assert reloaded.generate(images, max_new_tokens=6) == vlm.generate(images, max_new_tokens=6), (
        "captions differ after save/load"
    )


def _check_label_mask(vlm, ignore_index: int) -> None:
    """Labels are set exactly on each row's target span (caption + end token): never on the
    image slots, the prompt, or padding, whatever the padding side."""
    batch = vlm.tokenize([CAPTIONS[0], CAPTIONS[1]])
    for row, caption in enumerate(CAPTIONS):
        f = vlm.format(caption)
        ids = batch.input_ids[row].tolist()
        labels = batch.labels[row].tolist()
        attention = batch.attention_mask[row].tolist()
        real = sum(attention)
        start = len(f.before) + vlm.num_prefix_tokens + len(f.after)
        assert ids[start:real] == f.target, "target ids are not where the formatter put them"
        want = [ignore_index] * start + f.target + [ignore_index] * (len(ids) - real)
        assert labels == want, f"row {row}: labels are not masked exactly to the caption + end span"
        image = batch.image_mask[row].tolist()
        assert sum(image) == vlm.num_prefix_tokens and image[len(f.before)], "image slots misplaced"


# ------------------------------------------------------------------------------- ONNX, from a test


def export_onnx(model, folder: str | Path, **options):
    """Export ``model`` (a ``PrefixConditioningVLM``: ``vlmkit.build``/``vlmkit.load``) to ONNX in
    ``folder`` as ``vlmkit export --format onnx`` does, its self-checks included (graphs against
    PyTorch, real captions teacher-forced through the runtime); replaces ``folder``. ``options``:
    ``opset``, ``quantize``. Returns the export's result (``.path``, ``.checks``, ``.files``)."""
    from vlmkit.export import export_vlm

    return export_vlm(model, folder, format="onnx", overwrite=True, **options)


def onnx_captions(folder: str | Path, images, *, max_new_tokens: int = PARITY_TOKENS, return_ids: bool = False,
                  variant: str | None = None):  # fmt: skip
    """Captions (or token ids, with ``return_ids``) of ``images`` from the torch-free ONNX runtime
    (``vlmkit.runtime.onnx.OnnxCaptioner``), greedy, one thread: what users of the export get."""
    from vlmkit.runtime.onnx import OnnxCaptioner

    captioner = OnnxCaptioner(folder, variant=variant, threads=1)
    return captioner.generate(images, max_new_tokens=max_new_tokens, return_ids=return_ids)


def check_onnx_parity(model, folder: str | Path, images=None, *, max_new_tokens: int = PARITY_TOKENS):
    """Export ``model`` to ``folder`` (``export_onnx``) and caption ``images`` (default: three
    ``sample_images``) with the ONNX runtime: the same token ids as PyTorch's ``generate``,
    greedy. Returns ``{"ids", "image_dependent", "checks"}``; ``AssertionError`` on a difference
    (``ExportError`` when the export itself refuses or fails its self-checks)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise AssertionError(f"the ONNX check needs vlmkit[onnx] ({exc}); or pass onnx=False") from exc
    images = sample_images(3) if images is None else images
    want = model.generate(images, max_new_tokens=max_new_tokens, return_ids=True)
    result = export_onnx(model, folder)
    got = onnx_captions(result.path, images, max_new_tokens=max_new_tokens, return_ids=True)
    assert got == want, f"the ONNX runtime generates {got}, PyTorch {want} (same images, greedy)"
    # a tiny random LM may ignore the image (a short attention window, weak residual branches)
    image_dependent = len({tuple(row) for row in want}) > 1
    return {"ids": want, "image_dependent": image_dependent, "checks": result.checks}


def caption_logits(model, images, captions: list[str]) -> list[tuple[list[int], Any]]:
    """For each image and its caption: the target ids (caption + end token) and PyTorch's logits
    before each of them (``[len(target), vocab]``, numpy), the model fed the image and the ids as
    in training. ``onnx_caption_logits`` gives the runtime's, to compare."""
    import torch

    from vlmkit.core.model import IGNORE_INDEX

    pixels = model.preprocess(images)
    batch = model.tokenize(list(captions))
    with torch.no_grad():
        logits = model(**batch.to_dict(), pixel_values=pixels, return_logits=True)["logits"].float()
    out = []
    for row in range(len(captions)):
        at = (batch.labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        out.append((batch.input_ids[row, at].tolist(), logits[row, at - 1].cpu().numpy()))
    return out


def onnx_caption_logits(folder: str | Path, images, targets: list[list[int]]):
    """The ONNX runtime's logits before each target id, the image's prefix and the prompt first
    (the runtime's own prompt assembly and ``embed_tokens.npy``): one ``[len(target), vocab]``
    array per image, to compare with ``caption_logits``."""
    import numpy as np

    from vlmkit.runtime.onnx import OnnxCaptioner

    captioner = OnnxCaptioner(folder, variant="fp32", threads=1)
    pixels = np.asarray(captioner.preprocess(images))
    return captioner.teacher_forced_logits(pixels, targets)


# ------------------------------------------------------------------------------- datasets


def check_dataset(
    spec: DatasetSpec, options: dict | None = None, *, seed: int = 0, sample: int = 32
) -> dict[str, Any]:
    """A dataset plugin yields captioned RGB images in three seeded, deterministic, disjoint splits."""
    sizes, ids = {}, {}
    for split in SPLITS:
        data = spec.load(split, options, seed=seed)
        assert len(data) > 0, f"{spec.name} split {split!r} is empty"
        assert isinstance(data.fingerprint, str) and data.fingerprint, "a split needs a fingerprint"
        ids[split] = [data[i].id for i in range(len(data))]
        assert len(set(ids[split])) == len(ids[split]), f"{spec.name} split {split!r} repeats ids"
        for i in range(min(sample, len(data))):
            ex = data[i]
            assert ex.captions and all(isinstance(c, str) and c.strip() for c in ex.captions), (
                f"{ex.id}: no caption"
            )
            image = ex.load_image()
            assert image.mode == "RGB" and min(image.size) > 0
        again = spec.load(split, options, seed=seed)
        assert [again[i].id for i in range(len(again))] == ids[split], (
            f"{spec.name} split {split!r} is not deterministic"
        )
        assert again.fingerprint == data.fingerprint, "fingerprint must be stable"
        sizes[split] = len(data)
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        shared = set(ids[a]) & set(ids[b])
        assert not shared, (
            f"{spec.name}: splits {a} and {b} share {len(shared)} images, e.g. {sorted(shared)[:3]}"
        )
    return sizes
