"""Tiny, randomly initialised checkpoints of real vision-encoder architectures, for tests.

Each is written the way the real thing is published (``save_pretrained`` with its image
processor for transformers; ``timm.models.save_for_hf`` for timm) and loads through the same
code path as a Hub checkpoint, in well under a second, with no network::

    from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

    checkpoint = tiny_encoder_checkpoint("siglip", tmp_path / "siglip")
    encoder = get_registry().encoder("siglip").load(checkpoint)
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("siglip", "siglip2", "clip", "timm")

#: the transformer both SigLIP and CLIP towers get: 2 layers, width 32, 8 px patches
_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
}
_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "vocab_size": 99,
    # CLIP's defaults (49406/49407) lie outside a 99-token vocabulary
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_encoder_checkpoint(
    arch: str,
    path: str | Path,
    *,
    image_size: int = 32,
    seed: int = 0,
    full: bool = False,
    timm_model: str = "test_efficientnet",
) -> str:
    """Write a tiny random checkpoint of ``arch`` to the folder ``path``; return the checkpoint
    string to pass to that encoder plugin's ``load``.

    Args:
        arch: ``siglip`` (``SiglipVisionModel``), ``siglip2`` (NaFlex ``Siglip2VisionModel``),
            ``clip`` (``CLIPVisionModel``) or ``timm`` (``timm_model``, default
            ``test_efficientnet``).
        path: folder to create (parents too); an existing checkpoint there is overwritten.
        image_size: input resolution. Transformers models use 8 px patches, so 32 gives a 4x4
            grid. timm models: the preprocessing size (``test_efficientnet`` has stride 32, so
            64 px gives 2x2); ViT-like timm models are also built at this size.
        seed: weights are a function of the seed alone (the global RNG is left untouched).
        full: for ``siglip``/``clip``, write the full dual-tower model (vision + a tiny text
            tower), as the Hub's ``google/siglip-*`` and ``openai/clip-*`` checkpoints are.
        timm_model: which timm architecture ``arch="timm"`` builds.
    """
    import torch

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if full and arch not in ("siglip", "clip"):
        raise ValueError(f"full=True applies to siglip and clip, not {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "timm":
            return _timm(path, image_size, timm_model)
        model, processor = _transformers(arch, image_size, full)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _transformers(arch: str, image_size: int, full: bool):
    import transformers as t

    vision = {**_VIT, "image_size": image_size}
    if arch == "siglip":
        processor = t.SiglipImageProcessor(size={"height": image_size, "width": image_size})
        if full:
            return t.SiglipModel(t.SiglipConfig(vision_config=vision, text_config=_TEXT)), processor
        return t.SiglipVisionModel(t.SiglipVisionConfig(**vision)), processor
    if arch == "clip":
        processor = t.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        if full:
            return t.CLIPModel(t.CLIPConfig(vision_config=vision, text_config=_TEXT)), processor
        return t.CLIPVisionModel(t.CLIPVisionConfig(**vision)), processor
    # siglip2 (NaFlex): sized by a patch budget, not an image size
    patches = (image_size // _VIT["patch_size"]) ** 2
    config = t.Siglip2VisionConfig(**_VIT, num_patches=patches)
    processor = t.Siglip2ImageProcessor(patch_size=_VIT["patch_size"], max_num_patches=patches)
    return t.Siglip2VisionModel(config), processor


def _timm(path: Path, image_size: int, model_name: str) -> str:
    import timm
    from timm.models import save_for_hf

    try:  # ViT-like models size their position embeddings at construction
        model = timm.create_model(model_name, pretrained=False, img_size=image_size)
    except TypeError:  # convolutional: any input size works
        model = timm.create_model(model_name, pretrained=False)
    save_for_hf(
        model, str(path), safe_serialization=True, data_config={"input_size": (3, image_size, image_size)}
    )
    return str(path)
