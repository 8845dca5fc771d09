"""The plugin contract suite: what every encoder, decoder and dataset plugin must do.

vlmkit runs it on every built-in plugin; a plugin author runs the same functions on theirs::

    from vlmkit.testing import check_decoder, tiny_decoder_checkpoint

    def test_my_decoder_contract(tmp_path):
        check_decoder(MyDecoder(), tiny_decoder_checkpoint("llama", tmp_path / "llama"), tmp_path)

Each ``check_*`` function raises ``AssertionError`` with a message saying which promise broke,
and returns a small report (dict) of what it measured.
"""

from __future__ import annotations

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


def check_decoder(
    spec: DecoderSpec,
    checkpoint: str | None,
    tmp_path: str | Path,
    *,
    styles: tuple[str, ...] = ("auto", "plain"),
    encoder: EncoderSpec | None = None,
    encoder_checkpoint: str | None = None,
    onnx: bool = True,
) -> dict[str, Any]:
    """A decoder plugin: loads, refuses nothing it declares, resolves LoRA targets, formats so
    that generation sees exactly the training context, masks labels exactly on caption + end
    token for each style, trains a step, computes the same loss on caption positions as on full
    logits (at realistic logit magnitudes), generates (batched = one by one), round-trips
    save/load (from another folder and working directory) and, with ``onnx``, exports to ONNX
    and captions with the torch-free runtime exactly as PyTorch does, its LoRA and projection
    randomised so that captions depend on them. vlmkit errors become ``AssertionError``."""
    from vlmkit.core.errors import VlmkitError

    try:
        return _check_decoder(spec, checkpoint, Path(tmp_path), styles, encoder, encoder_checkpoint, onnx)
    except VlmkitError as exc:
        raise AssertionError(f"decoder {spec.name!r}: {type(exc).__name__}: {exc}") from exc


def _check_decoder(spec, checkpoint, tmp_path, styles, encoder, encoder_checkpoint, onnx) -> dict[str, Any]:
    import torch

    from vlmkit.core.model import IGNORE_INDEX, PrefixConditioningVLM

    report: dict[str, Any] = {"lora_targets": _check_loaded(spec, checkpoint, styles)}

    # build a VLM around the decoder with a toy (or given) encoder
    encoder = encoder or ToyEncoderSpec()
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
    for style in styles:
        vlm = PrefixConditioningVLM.build({**config, "prompt_format": style}, registry=registry)
        _check_label_mask(vlm, IGNORE_INDEX)
    vlm = PrefixConditioningVLM.build(config, registry=registry)
    images = sample_images(3)
    pixels = vlm.preprocess(images)
    batch = vlm.tokenize(CAPTIONS + CAPTIONS[:1])
    params = [p for group in vlm.trainable_parameter_groups().values() for p in group]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    vlm.train()
    loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
    assert torch.isfinite(loss), f"{spec.name}: loss is {loss.item()}"
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    assert changed == len(params), f"{spec.name}: only {changed} of {len(params)} trainable tensors changed"
    report["loss"] = float(loss.detach())
    report["loss_paths"] = _check_loss_paths(spec, vlm, batch, pixels)

    _randomise(vlm)
    captions = vlm.generate(images, max_new_tokens=8)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
    features = vlm.encode(pixels[:2])
    prompts = [PROMPT, "A much longer prompt that forces left padding in a batch."]
    batched = vlm.generate(features=features, prompt=prompts, max_new_tokens=6, return_ids=True)
    single = [
        vlm.generate(features=features[i : i + 1], prompt=p, max_new_tokens=6, return_ids=True)[0]
        for i, p in enumerate(prompts)
    ]
    assert batched == single, (
        f"{spec.name}: batched (left-padded) generation {batched} != one by one {single}"
    )
    _check_round_trip(spec, vlm, registry, batch, pixels, images, tmp_path)
    if onnx:
        report["onnx"] = _check_onnx(spec, vlm, images, tmp_path)
    report["captions"] = captions
    return report


def _check_loaded(spec: DecoderSpec, checkpoint, styles) -> list[str]:
    """The loaded model and tokenizer, the LoRA targets, stop tokens and formatting."""
    model, tokenizer = spec.load(checkpoint)
    assert model.config.model_type in spec.model_types, (
        f"{spec.name} loaded a {model.config.model_type!r} model but declares {spec.model_types}"
    )
    assert tokenizer.pad_token_id is not None, f"{spec.name} must set a pad token"
    targets = spec.resolve_lora_targets(model)
    names = {n for n, _ in model.named_modules()}
    assert targets, f"{spec.name} resolved no LoRA targets"
    for t in targets:
        assert any(n == t or n.endswith("." + t) for n in names), f"LoRA target {t!r} is not a module"
    if hasattr(spec, "resolve_layer_class"):  # FSDP wraps these blocks: a misspelt name must fail
        layer = spec.resolve_layer_class(model)
        assert any(type(m).__name__ == layer for m in model.modules()), f"no {layer} block in the model"
    stops = spec.stop_token_ids(tokenizer)
    assert stops, f"{spec.name} declares no stop tokens"
    for style in styles:
        for caption in CAPTIONS:
            gen = spec.format(tokenizer, PROMPT, None, style)
            train = spec.format(tokenizer, PROMPT, caption, style)
            assert (gen.before, gen.after) == (train.before, train.after), (
                f"{spec.name} style {style!r}: the generation context differs from the training one"
            )
            assert not gen.target, "format(caption=None) must have an empty target"
            assert train.target and train.target[-1] in spec.stop_token_ids(tokenizer, style), (
                f"{spec.name} style {style!r}: target must end with a stop token"
            )
            text = tokenizer.decode(train.target, skip_special_tokens=True).strip()
            assert text == caption.strip(), (
                f"{spec.name} style {style!r}: target decodes to {text!r}, not {caption!r}"
            )
    return targets


#: the largest logit the loss check scales the LM head to (trained LMs reach 20-50; tiny random
#: ones ~0.1, where softcapping or logit scaling hardly changes a loss)
REALISTIC_LOGIT = 40.0


def _check_loss_paths(spec, vlm, batch, pixels) -> dict[str, float]:
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
        f"{spec.name}: the training loss on caption positions ({float(fast):.6g}) differs from the loss "
        f"on the model's own logits ({float(full):.6g}; largest logit {peak:.3g}): the loss skips part of "
        "the model's output path"
    )
    return {"loss": float(full), "largest_logit": peak}


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


def _check_round_trip(spec, vlm, registry, batch, pixels, images, tmp_path: Path) -> None:
    """Saved, moved to another folder and loaded from another working directory: same logits
    and captions."""
    import contextlib
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
    assert torch.allclose(a, b, atol=1e-5), f"{spec.name}: logits differ after save/load"
    assert reloaded.generate(images, max_new_tokens=6) == vlm.generate(images, max_new_tokens=6), (
        f"{spec.name}: captions differ after save/load"
    )


def _check_onnx(spec, vlm, images, tmp_path: Path) -> dict[str, Any]:
    """Export to ONNX and caption with the torch-free runtime: the same ids as PyTorch."""
    try:
        from vlmkit.export import export_vlm
        from vlmkit.runtime.onnx import OnnxCaptioner
    except ImportError as exc:
        raise AssertionError(f"the ONNX check needs vlmkit[onnx] ({exc}); or pass onnx=False") from exc
    steps = 12
    want = vlm.generate(images, max_new_tokens=steps, return_ids=True)
    assert max(len(set(row)) for row in want) > 1, (
        f"{spec.name}: with randomised LoRA and projection, PyTorch captions are degenerate ({want}); "
        "the ONNX comparison would prove little"
    )
    result = export_vlm(vlm, tmp_path / f"{spec.name}-onnx", format="onnx", overwrite=True)
    got = OnnxCaptioner(result.path, threads=1).generate(images, max_new_tokens=steps, return_ids=True)
    assert got == want, f"{spec.name}: the ONNX runtime generates {got}, PyTorch {want} (same images, greedy)"
    # a tiny random LM may ignore the image (a short attention window, weak residual branches)
    image_dependent = len({tuple(row) for row in want}) > 1
    return {"ids": want, "image_dependent": image_dependent, "checks": result.checks}


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
