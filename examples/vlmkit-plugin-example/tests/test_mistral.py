"""The ``mistral`` decoder keeps vlmkit's decoder contract, on a tiny random Mistral."""

from __future__ import annotations

import pytest
from vlmkit import PluginError
from vlmkit.testing import check_decoder, tiny_decoder_checkpoint

from vlmkit_plugin_example.mistral import MistralDecoder
from vlmkit_plugin_example.testing import tiny_mistral_checkpoint


def test_mistral_passes_the_vlmkit_decoder_contract(tiny_mistral, tmp_path):
    report = check_decoder(MistralDecoder(), tiny_mistral, tmp_path)

    assert report["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_instruct_layout_puts_the_image_in_the_user_turn(tiny_mistral):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    f = MistralDecoder().format(tokenizer, "Describe the image.", "A red circle.")

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    assert f.before[0] == tokenizer.bos_token_id
    assert text(f.before).strip() == "<s>[INST]"
    assert text(f.after).strip() == "Describe the image. [/INST]"
    assert f.target[-1] == tokenizer.eos_token_id
    assert text(f.target[:-1]).strip() == "A red circle."
    assert MistralDecoder().stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_base_checkpoint_without_template_uses_the_plain_format(tmp_path):
    from transformers import AutoTokenizer

    path = tiny_mistral_checkpoint(tmp_path / "base", chat=False)
    spec = MistralDecoder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    f = spec.format(tokenizer, "", "A red circle.")

    assert f.before == [tokenizer.bos_token_id] and f.after == []
    assert f.target[-1] == tokenizer.eos_token_id
    assert spec.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_pad_token_is_set_from_eos_when_loading(tiny_mistral):
    model, tokenizer = MistralDecoder().load(tiny_mistral)

    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_a_checkpoint_of_another_family_is_refused_by_name(tmp_path):
    llama = tiny_decoder_checkpoint("llama", tmp_path / "llama")

    with pytest.raises(
        PluginError, match=r"is a 'llama' model; decoder 'mistral' accepts model_type 'mistral'"
    ):
        MistralDecoder().load(llama)
