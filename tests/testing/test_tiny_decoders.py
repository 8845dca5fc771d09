"""The public tiny-tokenizer and tiny-checkpoint factories give the tokenizer shapes families use
and leave the caller's random state alone."""

from __future__ import annotations

import pytest

from vlmkit.testing import tiny_decoder_checkpoint_from_config, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_byte_level_bpe_without_bos():
    tok = tiny_tokenizer("chatml")
    assert tok.bos_token is None
    ids = tok("A red circle.")["input_ids"]
    assert tok.decode(ids) == "A red circle."  # nothing added before the text
    assert tok.convert_ids_to_tokens(tok(" red")["input_ids"])[0].startswith("Ġ")  # byte-level


def test_sentencepiece_like_with_its_own_special_names_and_a_template_rejecting_a_system_role():
    tok = tiny_tokenizer("gemma")
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == (
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("A red circle.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1]).startswith("▁")
    user = [{"role": "user", "content": "Describe the image."}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True).startswith(
        "<bos><start_of_turn>user"
    )
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)


def test_checkpoint_from_config_takes_a_tokenizer_and_leaves_the_global_generator_alone(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    tok = tiny_tokenizer("phi3")
    tok.eos_token = "</s>"  # a tokenizer you adjusted: its ids go into the config
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = tiny_decoder_checkpoint_from_config(LlamaConfig(**small), tok, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state), "the caller's random stream moved"

    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.eos_token == "</s>" and len(loaded) == len(tok)
    config = LlamaConfig.from_pretrained(path)
    assert (config.vocab_size, config.eos_token_id, config.bos_token_id) == (len(tok), tok.eos_token_id, 1)
    again = tiny_decoder_checkpoint_from_config(LlamaConfig(**small), tok, tmp_path / "b")
    weights = [load_file(f"{p}/model.safetensors") for p in (path, again)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # seeded: the same weights
