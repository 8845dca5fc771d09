"""``PrefixConditioningVLM`` (``vlmkit.core.model``): label masking, the two forward paths, the
target-only loss, generation, save/load, and the one-line errors of building and loading.

Tiny random checkpoints of real architectures (a 4x4-token SigLIP, GPT-2 and Llama LMs), loaded
through the installed plugins. The contract suite (``test_contract_builtins.py``) checks label
masking, batching and the save/load round trip for every decoder family; this file adds what the
suite does not (GPT-2's pad == EOS, unfrozen encoder layers, errors).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.core.artifact import MANIFEST
from vlmkit.core.errors import ArtifactError, ConfigError, PluginError
from vlmkit.core.model import IGNORE_INDEX, PrefixConditioningVLM
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint

CAPTIONS = ["A red circle on the left.", "Two dogs play in the snow."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "siglip": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "gpt2": tiny_decoder_checkpoint("gpt2", root / "gpt2"),
        "llama": tiny_decoder_checkpoint("llama", root / "llama"),
    }


@pytest.fixture(scope="module")
def build(checkpoints):
    """``build(**overrides)``: a fresh SigLIP + GPT-2 model (seeded), through the installed plugins."""

    def make(**overrides) -> PrefixConditioningVLM:
        config = {
            "encoder": "siglip",
            "encoder_checkpoint": checkpoints["siglip"],
            "decoder": "gpt2",
            "decoder_checkpoint": checkpoints["gpt2"],
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "prompt": "Describe the image.",
            "max_caption_tokens": 16,
            **overrides,
        }
        return PrefixConditioningVLM.build(config)

    return make


@pytest.fixture(scope="module")
def images():
    return sample_images(2)


def nudge_lora(vlm, std: float = 0.3) -> None:
    """LoRA starts as a no-op; give it weight so that it matters to what is compared."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vlm.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=generator)


@pytest.fixture(scope="module")
def trained(build, images, fit_captions):
    """A GPT-2 model trained until greedy decoding reproduces ``CAPTIONS`` for ``images``."""
    torch.manual_seed(0)
    vlm = build(projection={"type": "mlp"}, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    features = vlm.encode(vlm.preprocess(images))
    assert fit_captions(vlm, features, CAPTIONS, max_steps=300), "training did not converge"
    vlm.eval()
    return vlm, features


# ------------------------------------------------------------------------------ labels and loss


def test_gpt2_labels_are_the_caption_and_its_eos_never_the_padding(build):
    """GPT-2's pad token *is* its EOS: the EOS closing a caption is a label, padding is not."""
    vlm = build(prompt="")
    tok = vlm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    short, long = "A dog.", "Two dogs play in the snow near a small wooden house."
    batch = vlm.tokenize([short, long])
    real = int(batch.attention_mask[0].sum())
    width = batch.input_ids.shape[1]
    assert real < width, "the short row must be padded"
    ids, labels = batch.input_ids[0], batch.labels[0]
    # the final EOS is a target...
    assert ids[real - 1] == eos and labels[real - 1] == eos
    # ...while the padding after it holds the same id and is never one
    assert (ids[real:] == eos).all()
    assert (labels[real:] == IGNORE_INDEX).all()
    assert (batch.attention_mask[0, real:] == 0).all()
    # labels are exactly caption + EOS; the image slots are not labels
    target = vlm.format(short).target
    assert labels[labels != IGNORE_INDEX].tolist() == target
    assert target[-1] == eos and tok.decode(target[:-1]).strip() == short
    assert (labels[batch.image_mask[0]] == IGNORE_INDEX).all()
    assert batch.labels[1, -1] == eos  # the long row ends with its EOS, unpadded


def test_generation_batches_have_no_labels_and_pad_on_the_left(build):
    vlm = build()
    prompts = ["Describe the image.", "A much longer prompt, padded on the left."]
    batch = vlm.tokenize([None, None], prompt=prompts, padding_side="left")
    assert batch.labels is None
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].tolist() == [1, 1]
    assert batch.image_mask.sum(dim=1).tolist() == [vlm.num_prefix_tokens] * 2


def test_forward_from_pixels_equals_forward_from_features(build, images):
    vlm = build()
    nudge_lora(vlm)
    vlm.eval()
    pixels = vlm.preprocess(images)
    batch = vlm.tokenize(CAPTIONS).to_dict()
    with torch.no_grad():
        from_pixels = vlm(**batch, pixel_values=pixels, return_logits=True)
        from_features = vlm(**batch, features=vlm.encode(pixels), return_logits=True)
    assert torch.equal(from_pixels["logits"], from_features["logits"])
    assert torch.equal(from_pixels["loss"], from_features["loss"])
    with pytest.raises(ValueError, match="pixel_values or features"):
        vlm(**batch)


def test_loss_on_target_positions_equals_the_full_logits_loss(build, checkpoints, images):
    vlm = build(decoder="smollm", decoder_checkpoint=checkpoints["llama"])  # chat format, a system turn
    nudge_lora(vlm)
    vlm.eval()
    batch = vlm.tokenize(["A dog.", CAPTIONS[1]])
    features = vlm.encode(vlm.preprocess(images))
    with torch.no_grad():
        fast = vlm(**batch.to_dict(), features=features)
        full = vlm(**batch.to_dict(), features=features, return_logits=True)
        # and both equal the LM's own loss, which shifts labels itself
        embeds = vlm.embed(batch.input_ids, batch.image_mask, vlm.projection(features))
        own = vlm.lm.get_base_model()(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    assert "logits" not in fast
    assert torch.allclose(fast["loss"], full["loss"], atol=1e-5)
    assert torch.allclose(full["loss"], own, atol=1e-5)


def test_the_target_only_loss_trains_the_same_gradients(build, images):
    vlm = build()
    nudge_lora(vlm)
    vlm.eval()  # no dropout, so both passes see one network
    batch = vlm.tokenize(CAPTIONS).to_dict()
    features = vlm.encode(vlm.preprocess(images))
    params = vlm.trainable_parameter_groups()["projection"]
    grads = []
    for return_logits in (False, True):
        vlm.zero_grad()
        vlm(**batch, features=features, return_logits=return_logits)["loss"].backward()
        grads.append([p.grad.clone() for p in params])
    for fast, full in zip(*grads, strict=True):
        assert torch.allclose(fast, full, atol=1e-6)


# ------------------------------------------------------------------------------ generation


def test_generation_stops_at_the_end_token(trained, monkeypatch):
    vlm, features = trained
    base = vlm.lm.get_base_model()
    raw = []
    real_generate = base.generate

    def spy(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        raw.append(out)
        return out

    monkeypatch.setattr(base, "generate", spy)
    ids = vlm.generate(features=features, max_new_tokens=40, return_ids=True)
    targets = [vlm.format(c).target for c in CAPTIONS]
    assert ids == [t[:-1] for t in targets]  # the caption, without its end token
    # the LM stopped by itself once every row had emitted EOS, far before 40 tokens
    (out,) = raw
    assert out.shape[1] == max(len(t) for t in targets)
    eos = vlm.tokenizer.eos_token_id
    for row, target in zip(out.tolist(), targets, strict=True):
        assert row[: len(target)] == target
        assert all(t == eos for t in row[len(target) :])  # a finished row is padded


@pytest.mark.parametrize("n", [1, 3])
def test_max_new_tokens_is_respected(trained, n):
    vlm, features = trained
    ids = vlm.generate(features=features, max_new_tokens=n, return_ids=True)
    assert ids == [vlm.format(c).target[:n] for c in CAPTIONS]


def test_default_length_is_max_caption_tokens(build, images):
    vlm = build(max_caption_tokens=3)
    nudge_lora(vlm)
    assert all(len(row) <= 3 for row in vlm.generate(images, return_ids=True))


def test_beam_search_and_sampling_return_strings(trained, images):
    vlm, features = trained
    beams = vlm.generate(images, num_beams=3, max_new_tokens=16)
    assert beams == CAPTIONS  # a confident model: the best beam is the greedy caption
    torch.manual_seed(0)
    sampled = vlm.generate(images, do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(0)
    again = vlm.generate(images, do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8)
    assert isinstance(sampled, list) and len(sampled) == 2 and all(isinstance(c, str) for c in sampled)
    assert sampled == again  # seeded sampling is reproducible
    assert vlm.caption(images, max_new_tokens=16) == CAPTIONS


def test_generate_needs_exactly_one_input(trained, images):
    vlm, features = trained
    with pytest.raises(ValueError, match="exactly one of"):
        vlm.generate(images, features=features)
    with pytest.raises(ValueError, match="exactly one of"):
        vlm.generate()


def test_generate_restores_training_mode(build, images):
    vlm = build()
    vlm.train()
    vlm.generate(images, max_new_tokens=2)
    assert vlm.training and vlm.lm.training
    assert not vlm.encoder.training  # a frozen encoder stays in eval mode


# ------------------------------------------------------------------------------ save / load


def test_unfrozen_encoder_layers_are_saved_and_restored(build, images, tmp_path, caplog):
    vlm = build(unfreeze_encoder_layers=1)
    groups = vlm.trainable_parameter_groups()
    last = vlm.encoder.layers()[-1]
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in last.parameters()}
    base = [p.detach().clone() for p in groups["encoder"]]
    optimizer = torch.optim.AdamW([p for g in groups.values() for p in g], lr=1e-2)
    vlm.train()
    assert last.training and not vlm.encoder.layers()[0].training  # only the unfrozen block trains
    pixels = vlm.preprocess(images)
    loss = vlm(**vlm.tokenize(CAPTIONS).to_dict(), pixel_values=pixels)["loss"]
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(base, groups["encoder"], strict=True))
    nudge_lora(vlm)  # so that the captions depend on the LoRA weights too
    vlm.eval()

    path = vlm.save(tmp_path / "model")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["files"]["encoder"] == "encoder.safetensors"
    assert (path / "encoder.safetensors").is_file()
    assert manifest["encoder"]["fingerprint"] == vlm.encoder.fingerprint()

    with caplog.at_level(logging.WARNING):
        reloaded = PrefixConditioningVLM.load(path)
    assert not [r for r in caplog.records if "differs" in r.getMessage()], caplog.text
    for mine, theirs in zip(groups["encoder"], reloaded.encoder.layers()[-1].parameters(), strict=True):
        assert torch.equal(mine, theirs)
    batch = vlm.tokenize(CAPTIONS).to_dict()
    with torch.no_grad():
        a = vlm(**batch, pixel_values=pixels, return_logits=True)["logits"]
        b = reloaded(**batch, pixel_values=pixels, return_logits=True)["logits"]
    assert torch.allclose(a, b, atol=1e-5)
    assert reloaded.generate(images, max_new_tokens=8) == vlm.generate(images, max_new_tokens=8)
    # loaded for inference, nothing trains
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_a_reloaded_model_saved_again_keeps_its_trained_encoder_layers(build, images, tmp_path, caplog):
    """Loaded for inference every weight is frozen; saving (or exporting) it again must still
    carry the trained encoder layers, not silently fall back to the base checkpoint's."""
    vlm = build(unfreeze_encoder_layers=1)
    with torch.no_grad():
        for p in vlm.encoder.layers()[-1].parameters():
            p.add_(0.1)  # trained: differs from the base checkpoint
    first = PrefixConditioningVLM.load(vlm.save(tmp_path / "first"))
    assert first.encoder_frozen
    path = first.save(tmp_path / "second")
    assert json.loads((path / MANIFEST).read_text())["files"]["encoder"] == "encoder.safetensors"
    with caplog.at_level(logging.WARNING):
        second = PrefixConditioningVLM.load(path)
    assert not [r for r in caplog.records if "differs" in r.getMessage()], caplog.text
    for mine, theirs in zip(vlm.encoder.parameters(), second.encoder.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_saving_again_with_a_frozen_encoder_drops_the_encoder_file(build, tmp_path):
    path = build(unfreeze_encoder_layers=1).save(tmp_path / "model")
    assert (path / "encoder.safetensors").is_file()
    build().save(path)
    assert not (path / "encoder.safetensors").exists()
    assert json.loads((path / MANIFEST).read_text())["files"]["encoder"] is None


def test_a_changed_encoder_is_warned_about_on_load(build, images, tmp_path, caplog):
    vlm = build()
    path = vlm.save(tmp_path / "model")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["encoder"]["fingerprint"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        PrefixConditioningVLM.load(path)
    assert any("differs from the one model" in r.getMessage() for r in caplog.records)


def test_a_changed_prompt_layout_is_warned_about_on_load(build, tmp_path, caplog):
    vlm = build()
    path = vlm.save(tmp_path / "model")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["prompt_ids"] == {"before": vlm.format(None).before, "after": vlm.format(None).after}
    with caplog.at_level(logging.WARNING):
        PrefixConditioningVLM.load(path)
    assert not [r for r in caplog.records if "lays out the prompt" in r.getMessage()], caplog.text

    # as if it had been trained when the plain layout had no start token
    manifest["prompt_ids"]["before"] = manifest["prompt_ids"]["before"][1:]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        PrefixConditioningVLM.load(path)
    warned = [r.getMessage() for r in caplog.records if "lays out the prompt" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0], caplog.text


def test_vlmkit_load_rebuilds_a_saved_model(trained, images, tmp_path):
    vlm, _ = trained
    path = vlm.save(tmp_path / "model", training={"steps": 1})
    loaded = vlmkit.load(path)
    assert isinstance(loaded, PrefixConditioningVLM)
    assert loaded.caption(images, max_new_tokens=16) == CAPTIONS
    assert json.loads((path / MANIFEST).read_text())["training"] == {"steps": 1}
    trainable = vlmkit.load(path, trainable=True)
    groups = trainable.trainable_parameter_groups()
    assert groups["projection"] and groups["lora"] and not groups["encoder"]


def test_save_refuses_a_folder_that_holds_something_else(build, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not a vlmkit model"):
        build().save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_loading_a_folder_that_is_not_a_model_is_one_line(tmp_path):
    with pytest.raises(ArtifactError) as exc:
        vlmkit.load(tmp_path)
    assert f"{tmp_path} is not a vlmkit model" in _one_line(exc)
    with pytest.raises(ArtifactError, match="does not exist") as exc:
        vlmkit.load(tmp_path / "nowhere")
    _one_line(exc)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON") as exc:
        vlmkit.load(tmp_path)
    _one_line(exc)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a vlmkit model manifest") as exc:
        vlmkit.load(tmp_path)
    _one_line(exc)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a vlmkit model manifest") as exc:
        vlmkit.load(tmp_path)
    _one_line(exc)


@pytest.mark.parametrize("part", ["adapter", "projection.safetensors"])
def test_a_model_missing_one_of_its_files_is_a_one_line_artifact_error(saved, tmp_path, part):
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    shutil.rmtree(path / part) if (path / part).is_dir() else (path / part).unlink()
    with pytest.raises(ArtifactError) as exc:
        vlmkit.load(path)
    file = "adapter/adapter_config.json" if part == "adapter" else part
    assert f"{file} is missing; save the model again" in _one_line(exc)


@pytest.fixture(scope="module")
def saved(build, tmp_path_factory):
    return build().save(tmp_path_factory.mktemp("saved") / "model")


@pytest.mark.parametrize(("part", "name"), [("encoder", "my-encoder"), ("decoder", "my-decoder")])
def test_a_manifest_naming_a_missing_plugin_is_refused_naming_it(saved, tmp_path, part, name):
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["config"][part] = name
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PluginError) as exc:
        vlmkit.load(path)
    message = _one_line(exc)
    assert f"unknown {part} {name!r}" in message and "not available" in message and str(path) in message


def test_a_manifest_from_a_newer_vlmkit_is_refused(saved, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] += 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="upgrade vlmkit"):
        vlmkit.load(path)


# ------------------------------------------------------------------------------ build errors


def test_a_model_built_from_relative_checkpoint_paths_loads_from_another_directory(
    build, checkpoints, images, tmp_path, monkeypatch
):
    # as after: vlmkit train --encoder-checkpoint ./siglip --decoder-checkpoint gpt2
    monkeypatch.chdir(Path(checkpoints["siglip"]).parent)
    vlm = build(encoder_checkpoint="./siglip", decoder_checkpoint="gpt2")
    nudge_lora(vlm)
    path = vlm.save(tmp_path / "model")
    manifest = json.loads((path / MANIFEST).read_text())
    assert (
        manifest["config"]["encoder_checkpoint"] == manifest["encoder"]["checkpoint"] == checkpoints["siglip"]
    )
    assert (
        manifest["config"]["decoder_checkpoint"] == manifest["decoder"]["checkpoint"] == checkpoints["gpt2"]
    )
    monkeypatch.chdir(tmp_path)
    assert vlmkit.load(path).caption(images, max_new_tokens=6) == vlm.caption(images, max_new_tokens=6)


def test_a_checkpoint_of_another_family_is_a_one_line_plugin_error(build, checkpoints):
    with pytest.raises(PluginError) as exc:
        build(decoder="qwen2", decoder_checkpoint=checkpoints["gpt2"])
    message = _one_line(exc)
    assert "'gpt2' model" in message and "decoder 'qwen2'" in message


def test_lora_targets_that_match_nothing_are_a_one_line_plugin_error(build):
    with pytest.raises(PluginError) as exc:
        build(lora={"targets": ["nope"]})
    message = _one_line(exc)
    assert "nope" in message and "c_attn" in message  # names what the model does have


@pytest.mark.parametrize(
    ("key", "value", "suggestion"), [("encoder", "siglp", "siglip"), ("decoder", "qwen", "qwen2")]
)
def test_unknown_plugin_names_are_refused_with_a_suggestion(build, key, value, suggestion):
    with pytest.raises(PluginError) as exc:
        build(**{key: value})
    assert f"did you mean {suggestion!r}" in _one_line(exc)


def test_bad_config_values_are_one_line_config_errors(build):
    with pytest.raises(ConfigError, match="format") as exc:
        build(format="chatty")
    _one_line(exc)
    with pytest.raises(ConfigError, match="unfreeze_encoder_layers=9 but encoder 'siglip' has 2 layers"):
        build(unfreeze_encoder_layers=9)
    with pytest.raises(ConfigError, match="nonsense"):
        build(nonsense=1)


# ------------------------------------------------------------------------------ trainable parts


def test_only_projection_and_lora_train_by_default(build):
    vlm = build()
    groups = vlm.trainable_parameter_groups()
    assert groups["projection"] and groups["lora"] and groups["encoder"] == []
    lora_names = {n for n, p in vlm.lm.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    grouped = {id(p) for g in groups.values() for p in g}
    assert grouped == {id(p) for p in vlm.parameters() if p.requires_grad}
    assert {id(p) for p in vlm.projection.parameters()} <= grouped
    assert vlm.encoder_frozen


def test_unfreezing_encoder_layers_adds_exactly_their_parameters(build):
    vlm = build(unfreeze_encoder_layers=2)
    groups = vlm.trainable_parameter_groups()
    want = {id(p) for layer in vlm.encoder.layers()[-2:] for p in layer.parameters()}
    assert {id(p) for p in groups["encoder"]} == want
    grouped = {id(p) for g in groups.values() for p in g}
    assert grouped == {id(p) for p in vlm.parameters() if p.requires_grad}
    assert not vlm.encoder_frozen


def test_a_model_saved_before_the_layout_change_still_loads(tmp_path, caplog):
    """``fixtures/model-0.1.0`` was saved by vlmkit before core/ was split (tiny SigLIP with one
    trained layer + tiny GPT-2): the artifact format is a promise, whatever moves inside vlmkit."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "model-0.1.0"
    model_dir = shutil.copytree(fixture, tmp_path / "model")
    expected = json.loads((model_dir / "expected.json").read_text())
    # the base checkpoints are referenced, not copied: rebuild the same tiny ones here
    encoder = tiny_encoder_checkpoint("siglip", tmp_path / "siglip", image_size=32)
    decoder = tiny_decoder_checkpoint("gpt2", tmp_path / "gpt2")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["config"].update(encoder_checkpoint=encoder, decoder_checkpoint=decoder)
    (model_dir / MANIFEST).write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        model = vlmkit.load(model_dir)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert model.generate(sample_images(2), return_ids=True) == expected["ids"]


# ------------------------------------------------------------------------------ devices


@pytest.fixture
def tensors_default_to_meta():
    """Tensors made without naming a device land on ``meta`` while a test runs: one that vlmkit
    builds without following the model (on a GPU: a CPU tensor beside CUDA weights) then fails
    here as it would there, with no GPU needed."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_generation_builds_every_tensor_on_the_models_device(trained, images, tensors_default_to_meta):
    vlm, features = trained
    assert vlm.generate(features=features.cpu(), max_new_tokens=16) == CAPTIONS
    assert vlm.caption(images, max_new_tokens=16) == CAPTIONS
    assert vlm.tokenize(CAPTIONS).input_ids.device == vlm.device


def test_the_loss_follows_the_models_device(trained, tensors_default_to_meta):
    vlm, features = trained
    loss = vlm(**vlm.tokenize(CAPTIONS).to_dict(), features=features)["loss"]
    assert loss.device == vlm.device and torch.isfinite(loss)


def test_half_precision_loads_the_frozen_base_in_it_and_keeps_trained_weights_fp32(build, images):
    vlm = PrefixConditioningVLM.build(build().settings, dtype="bfloat16")
    assert vlm.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in vlm.encoder.parameters()} == {torch.bfloat16}
    trained = [p for group in vlm.trainable_parameter_groups().values() for p in group]
    assert trained and {p.dtype for p in trained} == {torch.float32}  # fp32 master weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vlm(**vlm.tokenize(CAPTIONS).to_dict(), pixel_values=vlm.preprocess(images))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(build, images):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)  # the same LoRA init and dropout masks for both
        vlm = build(lora={"r": 4, "alpha": 8, "dropout": 0.0})
        nudge_lora(vlm)
        if checkpointing:
            vlm.gradient_checkpointing_enable()
        vlm.train()
        loss = vlm(**vlm.tokenize(CAPTIONS).to_dict(), pixel_values=vlm.preprocess(images))["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}
        lm = vlm.language_model
        on = (
            lm.is_activation_checkpointing
            if hasattr(lm, "is_activation_checkpointing")
            else lm.is_gradient_checkpointing
        )
        return loss.item(), grads, on

    plain_loss, plain, off = loss_and_grads(False)
    ckpt_loss, ckpt, on = loss_and_grads(True)
    assert (off, on) == (False, True)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert (
        plain.keys() == ckpt.keys()
        and any("lora_A" in n for n in plain)
        and any("projection" in n for n in plain)
    )
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_load_places_the_model_on_a_device_in_a_dtype(trained, images, tmp_path):
    vlm, _ = trained
    vlm.save(tmp_path / "m")
    loaded = vlmkit.load(tmp_path / "m", device="cpu", dtype="bf16")
    assert loaded.device == torch.device("cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert len(loaded.caption(images, max_new_tokens=4)) == 2
    assert {p.dtype for p in vlmkit.load(tmp_path / "m").parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        vlmkit.load(tmp_path / "m", device="cuda")
