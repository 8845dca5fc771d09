"""Test helpers for plugin authors: the plugin contract suite and tiny offline checkpoints.

This is the stable, public testing API; vlmkit runs exactly these checks on its own built-in
plugins. A plugin package's tests typically read::

    from vlmkit.testing import check_dataset, check_decoder, tiny_decoder_checkpoint_from_config
    from my_plugin.decoder import MyDecoder
    from my_plugin.dataset import MyDataset

    def test_my_decoder_keeps_the_vlmkit_contract(tmp_path):
        checkpoint = tiny_decoder_checkpoint_from_config(MyConfig(hidden_size=64, ...), "chatml", tmp_path / "lm")
        check_decoder(MyDecoder(), checkpoint, tmp_path)

    def test_my_dataset_keeps_the_vlmkit_contract(tmp_path):
        check_dataset(MyDataset(), {"path": str(tmp_path / "data")})

The contract suite (``vlmkit.testing.contract``): each ``check_*`` raises ``AssertionError`` saying
which promise broke, and returns a small report of what it measured.

- ``check_encoder(spec, checkpoint, tmp_path=None, *, onnx=True)``: loads frozen; features of the
  declared shape and grid; stable fingerprint; ``layers()``; ``check_encoder_runtime``. Given
  ``tmp_path``, also ``check_encoder_round_trip``.
- ``check_encoder_runtime(spec, checkpoint, tmp_path=None, *, onnx=True)``: the preprocessing
  declared as data (``image_processing``), run by the torch-free runtimes, equals ``preprocess``
  on ``awkward_images()`` (wide, tall, tiny, greyscale, RGBA, palette); with ``onnx``, the encoder's
  ONNX graph equals PyTorch at another batch size than traced.
- ``check_encoder_round_trip(spec, checkpoint, tmp_path, *, unfreeze=2, steps=3)``: trains the
  last ``unfreeze`` blocks a few steps (with ``ToyDecoderSpec``): frozen blocks stay in eval mode
  and unchanged (batch-norm statistics included); after save and load, the encoder state,
  features, fingerprint and captions equal the trained model's.
- ``check_decoder(spec, checkpoint, tmp_path, *, styles=("auto", "plain"), encoder=None,
  encoder_checkpoint=None, onnx=True, seed=0, attempts=5)``: model type, pad token, LoRA targets,
  layer class, stop tokens; formatting (generation context = training context; target = caption
  + stop token); the model builds (generate takes ``inputs_embeds``, peft accepts every LoRA
  target); label masking per style; one training step moves every trainable tensor (those it
  does not are named); the target-only loss equals the model's own full-logits loss at realistic
  logit magnitudes; ``check_token_ids``; with random LoRA and projection (``seed``, the next
  seeds while captions are degenerate, ``attempts`` in all): batched generation = one by one,
  save/move/load round trip, and (``onnx``) ``check_onnx_parity``. Uses ``ToyEncoderSpec``
  unless ``encoder`` is given. A failure names the plugin and the check (``CheckFailed``).
- ``check_token_ids(model, caption=...)``: for a caption given as token ids, the LM fed vlmkit's
  embeddings gives the model's own logits (Falcon-H1's ``embedding_multiplier`` is applied on
  the token-id path only).

ONNX from a test (``vlmkit[onnx]``), for any ``PrefixConditioningVLM`` (``vlmkit.build``,
``vlmkit.load``):

- ``export_onnx(model, folder, **options)``: ``vlmkit export --format onnx`` with its self-checks;
  ``onnx_captions(folder, images, *, max_new_tokens=12, return_ids=False)``: the torch-free
  runtime's captions; ``check_onnx_parity(model, folder, images=None)``: both, and the runtime's
  ids equal PyTorch's.
- ``caption_logits(model, images, captions)`` and ``onnx_caption_logits(folder, images, targets)``:
  PyTorch's and the runtime's logits before each target token, teacher-forced.
- ``check_dataset(spec, options=None, *, seed=0, sample=32)``: three non-empty, deterministic,
  disjoint splits of captioned RGB images with stable fingerprints.
- ``ToyEncoderSpec``: a tiny deterministic encoder (16 tokens of 16 dims) to pair with a decoder.
- ``ToyDecoderSpec``: a decoder spec for tiny Llama checkpoints, to pair with an encoder.
- ``make_registry(*specs)``: a fresh ``Registry`` holding just ``specs``, to build a
  ``PrefixConditioningVLM`` from specs that are not installed.
- ``registry_of(plugin_module)``: a fresh ``Registry`` holding what your plugin module registers
  through the hooks (as its entry point would).
- ``sample_images(n=2)``: ``n`` small distinct RGB PIL images; ``awkward_images()``: named images
  of awkward sizes and modes.

Tiny checkpoints of real architectures, random weights, built offline in about a second
(imported on first use; ``vlmkit.testing.tiny_decoders`` and ``.tiny_encoders`` document them):

- ``tiny_tokenizer(style, path=None)``: a ~640-token tokenizer with the conventions of a real
  family; ``style`` is one of ``TOKENIZER_STYLES`` (``smollm``, ``chatml``, ``phi3``, ``gemma``, ``plain``).
- ``tiny_decoder_checkpoint(arch, path=None)``: a folder with a tiny causal LM of a built-in
  architecture (``llama``, ``qwen2``, ``phi``, ``phi3``, ``gpt2``) and its tokenizer.
- ``tiny_decoder_checkpoint_from_config(config, tokenizer_style, path=None)``: the same for any
  transformers config you give (``tokenizer_style``: a style name or a tokenizer you built): how
  a plugin author gets a checkpoint of their own family.
- ``tiny_encoder_checkpoint(arch, path, *, image_size=32, ...)``: a tiny vision encoder
  (``siglip``, ``siglip2``, ``clip``, ``timm``) saved as the real ones are published.

``vlmkit.testing.browser`` drives a ``vlmkit export --format web`` folder in a headless Chromium
(Selenium with Debian's chromium and chromium-driver): ``chromium()``, ``serve(folder)``,
``caption_in_page(...)`` and ``python_captions(...)``, the Python ONNX runtime's captions that the
page must equal token for token. vlmkit's browser test and ``benchmarks/web_browser.py`` use it.

Importing ``vlmkit.testing`` does not import torch; the checks and factories import it when run.
"""

from __future__ import annotations

import importlib
from typing import Any

from vlmkit.testing.contract import (
    CheckFailed,
    ToyDecoderSpec,
    ToyEncoderSpec,
    awkward_images,
    caption_logits,
    check_dataset,
    check_decoder,
    check_encoder,
    check_encoder_round_trip,
    check_encoder_runtime,
    check_onnx_parity,
    check_token_ids,
    export_onnx,
    make_registry,
    onnx_caption_logits,
    onnx_captions,
    registry_of,
    sample_images,
)

#: public name -> the ``vlmkit.testing`` submodule that defines it (imported on first use)
_LAZY = {
    "tiny_tokenizer": "tiny_decoders",
    "tiny_decoder_checkpoint": "tiny_decoders",
    "tiny_decoder_checkpoint_from_config": "tiny_decoders",
    "TOKENIZER_STYLES": "tiny_decoders",
    "tiny_encoder_checkpoint": "tiny_encoders",
}

__all__ = [
    "TOKENIZER_STYLES",
    "CheckFailed",
    "ToyDecoderSpec",
    "ToyEncoderSpec",
    "awkward_images",
    "caption_logits",
    "check_dataset",
    "check_decoder",
    "check_encoder",
    "check_encoder_round_trip",
    "check_encoder_runtime",
    "check_onnx_parity",
    "check_token_ids",
    "export_onnx",
    "make_registry",
    "onnx_caption_logits",
    "onnx_captions",
    "registry_of",
    "sample_images",
    "tiny_decoder_checkpoint",
    "tiny_decoder_checkpoint_from_config",
    "tiny_encoder_checkpoint",
    "tiny_tokenizer",
]


def __getattr__(name: str) -> Any:
    submodule = _LAZY.get(name)
    if submodule is None:
        raise AttributeError(f"module 'vlmkit.testing' has no attribute {name!r}")
    qualified = f"vlmkit.testing.{submodule}"
    try:
        module = importlib.import_module(qualified)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == qualified:
            why = f"this vlmkit ({_version()}) has no {qualified}; upgrade or reinstall vlmkit"
        else:
            why = f"{qualified} failed to import ({exc}); the tiny checkpoints need pip install 'vlmkit[ml]'"
        raise ImportError(f"vlmkit.testing.{name} is not available: {why}") from exc
    try:
        value = getattr(module, name)
    except AttributeError:
        raise ImportError(
            f"vlmkit.testing.{submodule} does not define {name}; this vlmkit ({_version()}) is incomplete "
            "or mismatched"
        ) from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _version() -> str:
    from vlmkit import __version__

    return __version__
