"""``vlmkit export``: ONNX graphs with a KV cache (fp32, int8, int4), the torch-free ONNX Runtime
captioner, merged Hugging Face weights, and one-line errors for bad input.

Tiny random checkpoints of every decoder family (Llama, Qwen2, Phi, Phi-3, GPT-2) and every
encoder plugin (SigLIP, CLIP, timm) are paired so that five exports cover them all, together
with each token reduction. Exports are slow, so each model is built and exported once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmkit
from vlmkit.core.errors import ArtifactError, ConfigError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.export import MIN_OPSET, check_options, export_model, max_opset
from vlmkit.plugins.decoders.gpt2 import GPT2Decoder
from vlmkit.plugins.decoders.phi import PhiDecoder
from vlmkit.plugins.decoders.qwen2 import Qwen2Decoder
from vlmkit.plugins.decoders.smollm import SmolLMDecoder
from vlmkit.plugins.encoders.clip import ClipEncoder
from vlmkit.plugins.encoders.siglip import SiglipEncoder
from vlmkit.plugins.encoders.timm import TimmEncoder
from vlmkit.runtime.onnx import OnnxCaptioner, preprocess_images, resize_uint8_antialiased
from vlmkit.testing.contract import make_registry, sample_images
from vlmkit.testing.tiny_decoders import tiny_decoder_checkpoint
from vlmkit.testing.tiny_encoders import tiny_encoder_checkpoint

MAX_NEW_TOKENS = 10

#: name -> (encoder, encoder image size, decoder plugin, tiny architecture, projection, export options)
COMBOS = {
    "siglip-llama": ("siglip", 32, "smollm", "llama", {"reduction": "none"}, {"quantize": "int4"}),
    # CLIP at 56 px has a 7x7 grid: pooling it to 2x2 is the adaptive pooling ONNX lacks
    "clip-qwen2": ("clip", 56, "qwen2", "qwen2", {"reduction": "avgpool", "tokens": 4}, {}),
    "siglip-phi": (
        "siglip",
        32,
        "phi",
        "phi",
        {"reduction": "pixel_shuffle", "factor": 2},
        {"opset": MIN_OPSET},
    ),
    "clip-phi3": ("clip", 32, "phi", "phi3", {"reduction": "none"}, {"opset": max_opset()}),
    "timm-gpt2": ("timm", 64, "gpt2", "gpt2", {"reduction": "none"}, {"quantize": "int8"}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry():
    # The built-in plugins, independent of whatever the global registry holds during the session.
    return make_registry(
        SiglipEncoder(),
        ClipEncoder(),
        TimmEncoder(),
        SmolLMDecoder(),
        Qwen2Decoder(),
        PhiDecoder(),
        GPT2Decoder(),
    )


@pytest.fixture(scope="module")
def images():
    return sample_images(3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, registry):
    """``exported(name)`` -> (vlm, model folder, ONNX folder), built and exported once."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("export")

    def get(name: str):
        if name not in cache:
            encoder, size, decoder, arch, projection, options = COMBOS[name]
            folder = root / name
            config = {
                "encoder": encoder,
                "encoder_checkpoint": tiny_encoder_checkpoint(encoder, folder / "encoder", image_size=size),
                "decoder": decoder,
                "decoder_checkpoint": tiny_decoder_checkpoint(arch, folder / "decoder"),
                "projection": projection,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "prompt": "Describe the image.",
                "max_caption_tokens": MAX_NEW_TOKENS,
            }
            torch.manual_seed(0)  # LoRA's A matrices come from the global generator: the same model every run
            vlm = PrefixConditioningVLM.build(config, registry=registry)
            # LoRA starts as a no-op: give it weight so that merging it matters. 0.5 rather than
            # a gentle 0.05, so that the tiny random LMs produce varied tokens, not one repeated.
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in vlm.lm.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.5, generator=generator)
            vlm.eval()
            model = vlm.save(folder / "model")
            onnx = export_model(model, folder / "onnx", registry=registry, **options).path
            cache[name] = (vlm, model, onnx)
        return cache[name]

    return get


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(COMBOS))
def test_onnx_captions_match_pytorch_token_for_token(name, exported, images):
    vlm, _, onnx = exported(name)
    want = vlm.generate(images, return_ids=True)
    with vlm.lm.disable_adapter():
        unmerged = vlm.generate(images, return_ids=True)
    assert unmerged != want, "LoRA does not change the captions: the test would not see a missing merge"
    assert len({t for row in want for t in row}) > 2, "degenerate captions make a weak test"

    captioner = OnnxCaptioner(onnx, variant="fp32", threads=1)
    assert captioner.generate(images, return_ids=True) == want
    assert captioner.generate(images) == vlm.generate(images)
    manifest = json.loads((onnx / "vlmkit-onnx.json").read_text())
    assert manifest["checks"]["decoder_max_rel_diff"] < 1e-4
    assert manifest["vision"]["prefix_tokens"] == vlm.num_prefix_tokens


def test_the_key_value_cache_stays_on_the_providers_device_between_steps(exported, images, monkeypatch):
    """Through IO binding the cache is an ONNX Runtime value where the provider computed it (GPU
    memory under the CUDA provider), bound as the next step's input: never copied to numpy and
    back every token. On the CPU provider, the same path, on the CPU."""
    import onnxruntime as ort

    vlm, _, onnx = exported("siglip-llama")
    captioner = OnnxCaptioner(onnx, variant="fp32", threads=1)
    steps, step = [], captioner._step

    def recording(embeds, length, past, **kwargs):
        steps.append({type(v) for v in past.values()})
        logits, present = step(embeds, length, past, **kwargs)
        assert isinstance(logits, np.ndarray)
        assert all(isinstance(v, ort.OrtValue) and v.device_name().lower() == "cpu" for v in present.values())
        return logits, present

    monkeypatch.setattr(captioner, "_step", recording)
    assert captioner.generate(images, return_ids=True) == vlm.generate(images, return_ids=True)
    assert len(steps) > 2 and steps[0] == {np.ndarray} and all(s == {ort.OrtValue} for s in steps[1:])


def test_rows_stop_independently_like_pytorch(exported, images, tmp_path, monkeypatch):
    """A row that emits a stop token ends there while the others go on, as in PyTorch.

    Compared up to the step where the first row stops: after it, that row is fed padding, and a
    tiny random LM's near-tied logits for the other rows may flip with the batch's numerics (seen
    in about one run in seven, between two PyTorch runs)."""
    vlm, _, onnx = exported("siglip-llama")
    full = vlm.generate(images, return_ids=True)
    # a token row 0 emits but row 1 does not, made the only stop token on both sides
    stop = next((t for t in full[0] if t not in full[1]), full[0][-1])
    cut = full[0].index(stop)
    monkeypatch.setattr(PrefixConditioningVLM, "stop_token_ids", property(lambda self: [stop]))
    want = vlm.generate(images, return_ids=True)
    assert want[0] == full[0][:cut] and want[1][: cut + 1] == full[1][: cut + 1]

    copy = tmp_path / "onnx"
    shutil.copytree(onnx, copy)
    manifest = json.loads((copy / "vlmkit-onnx.json").read_text())
    manifest["tokens"]["stop_ids"] = [stop]
    (copy / "vlmkit-onnx.json").write_text(json.dumps(manifest))
    got = OnnxCaptioner(copy, variant="fp32", threads=1).generate(images, return_ids=True)
    assert got[0] == want[0] and got[1][: cut + 1] == want[1][: cut + 1]
    assert len(got[1]) > len(got[0])  # row 1 went on after row 0 stopped


@pytest.mark.parametrize(
    ("name", "variant", "bits", "size_ratio", "tolerance"),
    # GPT-2's Conv1D exports as Gemm, which the quantizer reaches only through our rewrite
    [("timm-gpt2", "int8", 8, 0.7, 0.1), ("siglip-llama", "int4", 4, 0.5, 0.2)],
    ids=["int8-gemm", "int4-matmul"],
)
def test_quantized_export_is_matmulnbits_close_to_fp32_and_captions(
    name, variant, bits, size_ratio, tolerance, exported, images
):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from vlmkit.export.onnx import _decoder_inputs

    _, _, folder = exported(name)
    captioner = OnnxCaptioner(folder, threads=1)  # quantized exports default to the quantized graphs
    assert captioner.variant == variant
    entry = captioner.manifest["variants"][variant]
    assert entry["method"] == "onnxruntime MatMulNBitsQuantizer"
    # the image and the prompt pass run the fp32 graphs; only the per-token decoder is quantized
    assert (entry["vision"], entry["prompt_decoder"]) == ("vision.onnx", "decoder.onnx")
    assert not (folder / f"vision.{variant}.onnx").exists()
    captions = captioner.generate(images)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
    graph = onnx.load(str(folder / f"decoder.{variant}.onnx")).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {
        helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"
    } == {bits}
    float_products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    vocab = captioner.manifest["decoder"]["vocab_size"]
    # int8 keeps the LM head float (the product as wide as the vocabulary), int4 nothing
    assert [n.name for n in float_products] == entry.get("kept_float", [])
    assert all(weights[n.input[1]][1] == vocab for n in float_products) and len(float_products) == (
        variant == "int8"
    )
    fp32_bytes = (folder / "decoder.onnx").stat().st_size
    assert (folder / f"decoder.{variant}.onnx").stat().st_size < size_ratio * fp32_bytes

    layout = {
        k: captioner.manifest["decoder"][k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size")
    }
    inputs = {k: v.numpy() for k, v in _decoder_inputs(layout, batch=2, past=3, new=4, seed=0).items()}
    fp32, quantized = (
        ort.InferenceSession(str(folder / f)).run(None, inputs)[0]
        for f in ("decoder.onnx", f"decoder.{variant}.onnx")
    )
    assert np.abs(quantized - fp32).max() < tolerance * np.abs(fp32).max()
    with pytest.raises(ConfigError, match=f"--quantize {variant}"):
        OnnxCaptioner(exported("clip-qwen2")[2], variant=variant)


def test_a_quantized_variant_runs_the_prompt_pass_on_the_fp32_decoder(exported, images):
    _, _, folder = exported("timm-gpt2")
    fp32, int8 = (OnnxCaptioner(folder, variant=v, threads=1) for v in ("fp32", "int8"))
    assert int8.prompt_decoder is not int8.decoder and fp32.prompt_decoder is fp32.decoder
    pixels = fp32.preprocess(images)
    targets = [[5, 9, 11, 3]] * len(images)
    want, got = fp32.teacher_forced_logits(pixels, targets), int8.teacher_forced_logits(pixels, targets)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a[0], b[0])  # the first token comes from the prompt pass: fp32
        assert not np.array_equal(a[1:], b[1:])  # the later ones from the int8 graph


def test_a_quantized_export_records_how_many_sample_captions_equal_the_fp32_graphs(exported):
    from vlmkit.export.onnx import agreement_images
    from vlmkit.export.quantize import AGREEMENT_THRESHOLD

    _, _, folder = exported("timm-gpt2")
    recorded = json.loads((folder / "vlmkit-onnx.json").read_text())["checks"]["caption_agreement"]
    images = agreement_images()
    fp32 = OnnxCaptioner(folder, variant="fp32", threads=1).generate(images, return_ids=True)
    int8 = OnnxCaptioner(folder, variant="int8", threads=1).generate(images, return_ids=True)
    assert recorded == {
        "variant": "int8",
        "vs": "fp32",
        "images": len(images),
        "identical": sum(a == b for a, b in zip(fp32, int8, strict=True)),
        "threshold": AGREEMENT_THRESHOLD,
    }
    assert len(images) >= 8 and len({im.size for im in images}) > 1
    unquantized = json.loads((exported("clip-qwen2")[2] / "vlmkit-onnx.json").read_text())["checks"]
    assert "caption_agreement" not in unquantized  # nothing to compare


def test_an_export_whose_quantized_graphs_caption_differently_says_so_in_one_warning_line(
    exported, tmp_path, monkeypatch
):
    import warnings

    import typer
    from typer.testing import CliRunner

    from vlmkit.cli.export import export_command
    from vlmkit.cli.main import _plugin_warnings_on_one_line

    _, model, _ = exported("timm-gpt2")
    monkeypatch.setattr(
        "vlmkit.core.registry.get_registry", lambda: make_registry(TimmEncoder(), GPT2Decoder())
    )
    real = OnnxCaptioner.generate

    def one_token_more(self, *args, **kwargs):  # the quantized graphs go on one token longer
        ids = real(self, *args, **kwargs)
        return ids if self.variant == "fp32" else [[*row, row[0] if row else 0] for row in ids]

    monkeypatch.setattr(OnnxCaptioner, "generate", one_token_more)
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)
    out = tmp_path / "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _plugin_warnings_on_one_line()  # as `vlmkit` prints vlmkit's warnings
        result = CliRunner().invoke(app, ["export", "-m", str(model), "-o", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    assert (
        lines[0].startswith("warning: the int8 graphs caption only 0 of ")
        and "without --quantize" in lines[0]
    )
    assert "check caption_agreement: 0 of" in result.stdout
    recorded = json.loads((out / "vlmkit-onnx.json").read_text())["checks"]["caption_agreement"]
    assert recorded["identical"] == 0 and recorded["images"] > 0


def test_runtime_imports_neither_torch_nor_transformers(exported, images, tmp_path):
    """What ``vlmkit caption --onnx`` runs: image files in, captions out, with no torch loaded."""
    _, _, folder = exported("siglip-llama")
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    script = textwrap.dedent(
        f"""
        import sys
        from vlmkit.evaluate.loop import caption_files
        from vlmkit.runtime.onnx import OnnxCaptioner

        captioner = OnnxCaptioner({str(folder)!r}, variant="fp32", threads=1)
        results = caption_files(captioner, {paths!r}, batch_size=2, max_new_tokens=4, num_beams=1)
        assert [r.error for r in results] == [None] * {len(paths)}, results
        heavy = sorted(m for m in ("torch", "transformers", "peft", "timm") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_runtime_refuses_what_the_export_cannot_do(exported, images):
    _, _, folder = exported("siglip-llama")
    captioner = OnnxCaptioner(folder, variant="fp32", threads=1)
    assert captioner.generate(images[:1], prompt="Describe the image.", max_new_tokens=2)  # the exported one
    with pytest.raises(ConfigError, match="prompt built in"):
        captioner.generate(images, prompt="What is this?")
    with pytest.raises(ConfigError, match="greedily"):
        captioner.generate(images, num_beams=3)


# ------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("name", ["siglip-llama", "clip-qwen2", "timm-gpt2"])
def test_numpy_preprocessing_equals_the_encoder_plugin_on_photos(name, exported):
    """transformers' processors (torchvision backend) and timm's (Pillow) transforms, reproduced
    in numpy on real photos of every shape."""
    import skimage.data
    from PIL import Image

    vlm, _, folder = exported(name)
    spec = json.loads((folder / "vlmkit-onnx.json").read_text())["preprocessing"]
    photos = [
        Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    for photo in photos + [photo.resize((37, 90)) for photo in photos[:2]]:
        want = vlm.preprocess([photo]).numpy()
        np.testing.assert_allclose(preprocess_images([photo], spec), want, atol=1e-5, rtol=0)


def test_an_encoder_that_declares_no_preprocessing_is_refused():
    from vlmkit.export.onnx import describe_preprocessing
    from vlmkit.testing.contract import ToyEncoderSpec

    encoder = ToyEncoderSpec().load()
    assert describe_preprocessing(encoder)["input_size"] == [32, 32]  # it declares its own
    encoder.image_processing = None
    with pytest.raises(ConfigError, match="declares no image_processing"):
        describe_preprocessing(encoder)


def test_a_declared_preprocessing_that_is_not_what_preprocess_does_is_refused():
    from vlmkit.export.onnx import _check_preprocessing, describe_preprocessing
    from vlmkit.testing.contract import ToyEncoderSpec

    encoder = ToyEncoderSpec().load()
    assert _check_preprocessing(encoder, describe_preprocessing(encoder)) < 1e-4
    encoder.image_processing = {
        **encoder.image_processing,
        "resize": {**encoder.image_processing["resize"], "resample": "bilinear"},
    }
    with pytest.raises(ConfigError, match="cannot reproduce"):
        _check_preprocessing(encoder, describe_preprocessing(encoder))


def test_antialiased_resize_is_bit_exact_with_torchvision():
    import torchvision.transforms.v2.functional as F

    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((97, 61), (32, 32)), ((20, 300), (224, 224)), ((224, 224), (256, 100))]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for mode in ("bilinear", "bicubic"):
            want = F.resize(
                torch.from_numpy(pixels).permute(2, 0, 1),
                [oh, ow],
                interpolation=F.InterpolationMode(mode),
                antialias=True,
            )
            np.testing.assert_array_equal(
                resize_uint8_antialiased(pixels, oh, ow, mode), want.permute(1, 2, 0).numpy()
            )


# ------------------------------------------------------------------------------ merged HF weights


def test_hf_export_loads_with_plain_transformers(exported, registry, images, tmp_path):
    from transformers import AutoModelForCausalLM

    vlm, model, _ = exported("siglip-llama")
    out = export_model(model, tmp_path / "hf", format="hf", registry=registry).path
    assert not list(out.rglob("adapter_config.json")), "a merged export carries no LoRA adapter"
    merged = AutoModelForCausalLM.from_pretrained(out / "decoder")
    assert not hasattr(merged, "peft_config")
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, vlm.lm(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )
    reloaded = vlmkit.load(out, registry=registry)
    assert reloaded.generate(images, return_ids=True) == vlm.generate(images, return_ids=True)


# ------------------------------------------------------------------------------ errors


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="is not a vlmkit model") as info:
        export_model(tmp_path, tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match="does not exist"):
        export_model(tmp_path / "missing", tmp_path / "out")


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, max_opset() + 1])
def test_export_refuses_an_unsupported_opset_naming_the_range(opset, tmp_path):
    with pytest.raises(ConfigError, match=f"from {MIN_OPSET} to {max_opset()}"):
        check_options("onnx", opset, None, tmp_path / "out", False)
    with pytest.raises(ConfigError, match="onnx and web only"):
        check_options("hf", None, "int8", tmp_path / "out", False)
    with pytest.raises(ConfigError, match="--format web only"):
        check_options("onnx", None, None, tmp_path / "out", False, embeddings="float16")


def test_export_refuses_an_existing_folder_unless_overwrite(exported, registry, tmp_path):
    _, model, onnx = exported("clip-qwen2")
    with pytest.raises(ArtifactError, match="--overwrite"):
        export_model(model, onnx, registry=registry)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="not a vlmkit export"):
        export_model(model, stranger, format="hf", overwrite=True, registry=registry)
    assert (stranger / "thesis.tex").exists()

    out = tmp_path / "hf"
    export_model(model, out, format="hf", registry=registry)
    (out / "stale.txt").write_text("from the last export")
    export_model(model, out, format="hf", overwrite=True, registry=registry)
    assert (out / "vlmkit-hf.json").is_file() and not (out / "stale.txt").exists()


def test_a_failed_export_leaves_nothing_that_looks_complete(exported, registry, tmp_path, monkeypatch):
    import vlmkit.export.quantize as quantize_module

    _, model, _ = exported("siglip-llama")

    def broken(source, target, variant, **options):
        Path(target).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantize_module, "quantize_graph", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, tmp_path / "out", quantize="int8", registry=registry)
    assert list(tmp_path.iterdir()) == [], "neither the folder nor its temporary twin may remain"
    with pytest.raises(ArtifactError, match="not a vlmkit ONNX export"):
        OnnxCaptioner(tmp_path)


def test_cli_export_prints_json_and_one_line_errors(exported, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from vlmkit.cli.export import export_command

    _, model, _ = exported("clip-phi3")
    monkeypatch.setattr(
        "vlmkit.core.registry.get_registry", lambda: make_registry(ClipEncoder(), PhiDecoder())
    )
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)  # two commands: typer then expects the command name
    runner = CliRunner()
    out = tmp_path / "hf"
    result = runner.invoke(
        app, ["export", "--model", str(model), "--output", str(out), "--format", "hf", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["format"] == "hf"
    again = runner.invoke(app, ["export", "-m", str(model), "-o", str(out), "--format", "hf"])
    assert isinstance(again.exception, ArtifactError) and "\n" not in str(again.exception)
    bad = runner.invoke(app, ["export", "-m", str(model), "-o", str(tmp_path / "x"), "--quantize", "int3"])
    assert bad.exit_code == 2  # a usage error: click lists the choices
    args = ["export", "-m", str(model), "-o", str(tmp_path / "y"), "--embeddings", "float32"]
    onnx_only = runner.invoke(app, args)
    assert isinstance(onnx_only.exception, ConfigError) and "--format web only" in str(onnx_only.exception)
    renamed = runner.invoke(app, ["export", "-m", str(model), "--out", str(tmp_path / "z")])
    assert renamed.exit_code == 2 and "renamed: use --output (-o)" in " ".join(
        renamed.output.replace("│", " ").split()
    )


# ------------------------------------------------------------------------------ teacher forcing


def test_every_export_teacher_forces_real_captions_through_the_runtime(exported):
    _, _, onnx = exported("siglip-llama")
    checks = json.loads((onnx / "vlmkit-onnx.json").read_text())["checks"]
    assert 0 <= checks["teacher_forced_max_rel_diff"] <= 1e-4


def test_teacher_forcing_catches_an_embedding_table_written_raw_for_a_scaled_embedding_family(
    tmp_path, monkeypatch
):
    """Gemma-2 multiplies token embeddings by sqrt(hidden) inside its embedding module. An export
    that writes the raw weight passes the graph checks (random ``inputs_embeds`` never touch the
    table); the teacher-forced check, fed real ids through the table, refuses it."""
    from transformers import Gemma2Config

    import vlmkit.export.onnx as onnx_export
    from vlmkit.core.errors import ExportError
    from vlmkit.export import export_vlm
    from vlmkit.sdk.decoders import TransformersDecoderSpec
    from vlmkit.testing import ToyEncoderSpec, tiny_decoder_checkpoint_from_config

    class Gemma2Decoder(TransformersDecoderSpec):
        name = "gemma2"
        model_types = ("gemma2",)
        lora_targets = ("q_proj", "v_proj")
        layer_class = "Gemma2DecoderLayer"

    config = Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
    )  # fmt: skip
    checkpoint = tiny_decoder_checkpoint_from_config(config, "gemma", tmp_path / "gemma2")
    registry = make_registry(ToyEncoderSpec(), Gemma2Decoder())
    vlm = PrefixConditioningVLM.build(
        {
            "encoder": "vlmkit-toy",
            "decoder": "gemma2",
            "decoder_checkpoint": checkpoint,
            "prompt": "Describe.",
        },
        registry=registry,
    ).eval()
    result = export_vlm(vlm, tmp_path / "ok")
    assert result.checks["teacher_forced_max_rel_diff"] <= 1e-4

    def raw_weight(lm, chunk=8192):  # the bug of the issue: the weight, not the module's output
        return lm.get_input_embeddings().weight.detach().float().numpy()

    monkeypatch.setattr(onnx_export, "embedding_table", raw_weight)
    with pytest.raises(ExportError, match=r"exported decoder, teacher-forced on real caption ids .* differs"):
        export_vlm(vlm, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
