"""Every built-in plugin passes the public plugin contract suite (``vlmkit.testing``), and every
built-in encoder pairs with every built-in decoder into a working ``PrefixConditioningVLM``.

Plugins come from the process-wide registry, i.e. through their installed entry points: the path
a third-party plugin takes. Models are tiny random checkpoints of the real architectures, built
once per module.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.core.registry import get_registry
from vlmkit.testing import (
    check_dataset,
    check_decoder,
    check_encoder,
    sample_images,
    tiny_decoder_checkpoint,
    tiny_encoder_checkpoint,
)

# encoder case -> (plugin, tiny_encoder_checkpoint arguments)
ENCODERS = {
    "siglip": ("siglip", {"arch": "siglip", "image_size": 32}),  # 4x4 grid
    "siglip2": ("siglip", {"arch": "siglip2", "image_size": 32}),  # NaFlex, through the siglip plugin
    "clip": ("clip", {"arch": "clip", "image_size": 40}),  # 5x5: an odd grid
    "timm": ("timm", {"arch": "timm", "image_size": 96}),  # test_efficientnet, stride 32: 3x3
}
# decoder case -> (plugin, tiny architecture)
DECODERS = {
    "smollm": ("smollm", "llama"),
    "qwen2": ("qwen2", "qwen2"),
    "phi-2": ("phi", "phi"),
    "phi-3": ("phi", "phi3"),
    "gpt2": ("gpt2", "gpt2"),
}
PAIR_ENCODERS = ("siglip", "clip", "timm")
#: spread over the pairs so each encoder and each decoder meets every reduction
PROJECTIONS = [
    {"type": "linear", "reduction": "none"},
    {"type": "mlp", "reduction": "avgpool", "tokens": 4},
    {"type": "linear", "reduction": "pixel_shuffle", "factor": 2},
    {"type": "mlp", "reduction": "none", "layernorm": False},
    {"type": "mlp", "reduction": "pixel_shuffle", "factor": 2, "hidden_dim": 32},
    {"type": "linear", "reduction": "avgpool", "tokens": 1},
]
PAIRS = [
    (enc, dec, PROJECTIONS[(i * len(DECODERS) + j) % len(PROJECTIONS)])
    for i, enc in enumerate(PAIR_ENCODERS)
    for j, dec in enumerate(DECODERS)
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry():
    return get_registry()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint("encoder" | "decoder", case)`` -> a tiny checkpoint folder, written once."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    cache: dict[tuple[str, str], str] = {}

    def get(kind: str, case: str) -> str:
        if (kind, case) not in cache:
            if kind == "encoder":
                args = dict(ENCODERS[case][1])
                cache[kind, case] = tiny_encoder_checkpoint(args.pop("arch"), root / f"enc-{case}", **args)
            else:
                cache[kind, case] = tiny_decoder_checkpoint(DECODERS[case][1], root / f"dec-{case}")
        return cache[kind, case]

    return get


def test_every_builtin_plugin_is_registered_through_its_entry_point(registry):
    assert {"siglip", "clip", "timm"} <= set(registry.names("encoder"))
    assert {"smollm", "qwen2", "phi", "gpt2"} <= set(registry.names("decoder"))
    assert {"shapes", "folder", "flickr30k", "coco"} <= set(registry.names("dataset"))
    for kind, name in [("encoder", "siglip"), ("decoder", "gpt2"), ("dataset", "shapes")]:
        assert registry.registration(kind, name).provider.package == "vlmkit"


# ------------------------------------------------------------------------------ the contract suite


@pytest.mark.parametrize("case", list(ENCODERS))
def test_builtin_encoder_keeps_the_contract(registry, checkpoint, case, tmp_path):
    # with tmp_path, the suite also trains the last two blocks and round-trips save/load
    report = check_encoder(registry.encoder(ENCODERS[case][0]), checkpoint("encoder", case), tmp_path)
    assert report["num_tokens"] > 0 and report["feature_dim"] > 0
    assert report["round_trip"]["unfrozen"] == 2 and report["round_trip"]["trained_tensors"] > 0


@pytest.mark.parametrize("case", list(DECODERS))
def test_builtin_decoder_keeps_the_contract(registry, checkpoint, case, tmp_path):
    report = check_decoder(registry.decoder(DECODERS[case][0]), checkpoint("decoder", case), tmp_path)
    assert math.isfinite(report["loss"])
    assert len(report["captions"]) == 3
    assert report["loss_paths"]["largest_logit"] > 5  # compared at a realistic magnitude
    assert report["onnx"]["image_dependent"]  # ONNX = PyTorch on captions that depend on the image


def test_shapes_dataset_keeps_the_contract(registry):
    options = {"size": 40, "image_size": 32, "colors": ["red", "blue"], "shapes": ["circle", "square"]}
    sizes = check_dataset(registry.dataset("shapes"), options)  # 8 caption classes of 5 images
    assert sum(sizes.values()) == 40


def test_folder_dataset_keeps_the_contract(registry, tmp_path):
    lines = []
    for i in range(16):
        name = f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (20 + i, 16), (15 * i, 90, 240 - 15 * i)).save(tmp_path / name)
        lines.append(json.dumps({"file_name": name, "caption": f"A picture, number {i}."}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    sizes = check_dataset(
        registry.dataset("folder"), {"path": str(tmp_path), "split_fractions": [0.5, 0.25, 0.25]}
    )
    assert sum(sizes.values()) == 16


# ------------------------------------------------------------------------------ every pair


@pytest.mark.parametrize(
    ("encoder", "decoder", "projection"),
    PAIRS,
    ids=[f"{e}-{d}-{p['reduction']}-{p['type']}" for e, d, p in PAIRS],
)
def test_every_encoder_decoder_pair_trains_a_step_and_captions(checkpoint, encoder, decoder, projection):
    config = {
        "encoder": ENCODERS[encoder][0],
        "encoder_checkpoint": checkpoint("encoder", encoder),
        "decoder": DECODERS[decoder][0],
        "decoder_checkpoint": checkpoint("decoder", decoder),
        "projection": projection,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "prompt": "Describe the image." if len(decoder) % 2 else "",
        "max_caption_tokens": 8,
    }
    vlm = PrefixConditioningVLM.build(config)  # through the process-wide registry
    images = sample_images(2)
    pixels = vlm.preprocess(images)
    features = vlm.encode(pixels)
    prefix = vlm.projection(features)
    assert prefix.shape[1] == vlm.num_prefix_tokens
    assert prefix.shape[2] == vlm.lm.get_input_embeddings().embedding_dim

    groups = vlm.trainable_parameter_groups()
    params = groups["projection"] + groups["lora"]
    assert groups["projection"] and groups["lora"] and not groups["encoder"]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    vlm.train()
    batch = vlm.tokenize(["A red circle on the left.", "Two dogs play in the snow."])
    loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params, strict=True))

    captions = vlm.generate(images, max_new_tokens=4)
    assert isinstance(captions, list) and len(captions) == 2
    assert all(isinstance(c, str) for c in captions)
    ids = vlm.generate(features=features, max_new_tokens=4, return_ids=True)
    assert all(len(row) <= 4 for row in ids)
