"""``check_encoder`` holds an encoder to its declared preprocessing and to its ONNX graph: the
torch-free runtimes run the declaration (``image_processing``), so a declaration that is not what
``preprocess`` does, on any image a user may pass, or a forward that does not export, fails it."""

from __future__ import annotations

import pytest
import torch

from vlmkit.testing import ToyEncoderSpec, awkward_images, check_encoder, check_encoder_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy(name: str, change):
    """A ``ToyEncoderSpec`` whose loaded encoder ``change(encoder)`` alters."""

    class Changed(ToyEncoderSpec):
        def load(self, checkpoint=None, *, revision=None):
            encoder = super().load(checkpoint, revision=revision)
            change(encoder)
            return encoder

    spec = Changed()
    spec.name = name
    return spec


def declare(**changes):
    def change(encoder):
        encoder.image_processing = {**encoder.image_processing, **changes}

    return change


def test_the_toy_encoder_keeps_its_declaration_and_exports():
    report = check_encoder(ToyEncoderSpec(), None)["runtime"]
    assert report["preprocessing_max_abs_diff"] <= 1e-4
    assert report["onnx_max_rel_diff"] <= 1e-4
    assert {"wide", "tall", "tiny", "greyscale", "rgba", "palette"} == set(awkward_images())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            toy(
                "wrong-filter", declare(resize={"size": {"height": 32, "width": 32}, "resample": "bilinear"})
            ),
            r"wrong-filter: on the wide image \(121x37, RGB\) the declared image_processing gives pixels up to "
            r"[0-9.]+ away from preprocess's",
        ),
        (toy("wrong-mean", declare(mean=[0.5, 0.5, 0.5])), "wrong-mean: on the wide image .* away from"),
        (
            toy(
                "wrong-size",
                declare(
                    input_size=[28, 28], resize={"size": {"height": 28, "width": 28}, "resample": "bicubic"}
                ),
            ),
            r"the declared image_processing makes \(3, 28, 28\) pixels, preprocess \(3, 32, 32\)",
        ),
        (
            toy("malformed", declare(resize={"size": {"height": 32, "width": 32}})),
            r"encoder 'malformed': ConfigError: encoder ToyEncoder: image_processing\['resize'\] lacks resample",
        ),
        (
            toy("unknown-filter", declare(resize={"size": {"height": 32, "width": 32}, "resample": "cubic"})),
            "unknown resample 'cubic'; use one of nearest, lanczos",
        ),
        (
            toy("undeclared", lambda encoder: setattr(encoder, "image_processing", None)),
            "undeclared: the encoder declares no image_processing",
        ),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else "",
)
def test_a_declaration_that_is_not_what_preprocess_does_fails(spec, message):
    with pytest.raises(AssertionError, match=message):
        check_encoder_runtime(spec, None, onnx=False)


def test_an_encoder_that_treats_alpha_otherwise_than_the_runtimes_fails_on_the_rgba_image():
    from PIL import Image

    def on_white(encoder):  # right for RGB images, so only the RGBA probe shows it
        preprocess = encoder.preprocess

        def composite(images):
            flat = []
            for im in images:
                if im.mode == "RGBA":
                    im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
                flat.append(im)
            return preprocess(flat)

        encoder.preprocess = composite

    with pytest.raises(AssertionError, match=r"on-white: on the rgba image \(45x45, RGBA\)"):
        check_encoder_runtime(toy("on-white", on_white), None, onnx=False)


def test_an_encoder_whose_forward_fixes_the_batch_size_fails_the_onnx_check(tmp_path):
    import torch

    def fixed_batch(encoder):  # a per-image tensor built for the traced batch (the NaFlex bug)
        forward = encoder.forward

        def per_image(pixel_values):
            scale = torch.tensor([[[1.0]]] * pixel_values.shape[0])
            return forward(pixel_values) * scale

        encoder.forward = per_image

    with pytest.raises(
        AssertionError,
        match=r"the exported vision graph fails on a batch of 13 images, another size than traced",
    ):
        check_encoder_runtime(toy("fixed-batch", fixed_batch), None, tmp_path)


def test_a_fingerprint_that_changes_with_the_dtype_fails_the_kit():
    """An encoder of a plugin's own that hashes its weights as they are now would make every
    bf16-trained model warn "encoder differs" when it loads in fp32: the kit says so."""
    import hashlib

    from vlmkit.testing import ToyEncoderSpec

    class DtypeFingerprint(ToyEncoderSpec):
        def load(self, checkpoint=None, *, revision=None):
            encoder = super().load(checkpoint, revision=revision)

            def fingerprint() -> str:
                digest = hashlib.sha256()
                for param in encoder.parameters():
                    digest.update(param.detach().contiguous().view(-1).view(torch.uint8).numpy())
                return digest.hexdigest()

            encoder.fingerprint = fingerprint
            return encoder

    spec = DtypeFingerprint()
    spec.name = "dtype-fingerprint"
    with pytest.raises(
        AssertionError, match="dtype-fingerprint: fingerprint changes when the encoder is cast"
    ):
        check_encoder(spec, None)
