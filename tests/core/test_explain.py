"""``vlmkit.explain`` and ``vlmkit inspect`` show exactly what the LM is fed for one example: the
ids training uses, where the image slots are, and labels on the caption and end token only."""

from __future__ import annotations

import json

import pytest

import vlmkit
from vlmkit.core.errors import ConfigError
from vlmkit.core.model import IGNORE_INDEX
from vlmkit.core.registry import get_registry
from vlmkit.testing import ToyEncoderSpec, make_registry, tiny_decoder_checkpoint, tiny_encoder_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTION = "A red circle on the left."
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_decoder_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def build(checkpoint, style):  # through the public surface, as a plugin author would
    registry = make_registry(ToyEncoderSpec(), get_registry().decoder("smollm"))
    config = {"encoder": "vlmkit-toy", "decoder": "smollm", "decoder_checkpoint": checkpoint}
    return vlmkit.build({**config, "prompt_format": style, "prompt": PROMPT}, registry=registry)


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_explain_shows_the_training_ids_image_slots_and_labels(llama, style):
    vlm = build(llama, style)
    shown = vlmkit.explain(vlm, CAPTION)

    batch = vlm.tokenize([CAPTION])  # what the collator gives the model
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    image = batch.image_mask[0].tolist()
    assert [p.index for p in shown.positions] == list(range(len(ids)))
    assert [p.part == "image" for p in shown.positions] == image
    assert [p.token_id for p in shown.positions] == [
        None if m else t for t, m in zip(ids, image, strict=True)
    ]
    assert [p.label for p in shown.positions] == [None if x == IGNORE_INDEX else x for x in labels]
    assert [p.part for p in shown.positions] == sorted(
        (p.part for p in shown.positions), key=["before", "image", "after", "target"].index
    )
    # labels on the caption and the end token, nowhere else
    assert shown.labelled == shown.part("target")
    target = [p.token_id for p in shown.labelled]
    assert target[-1] in shown.stop_token_ids
    assert vlm.tokenizer.decode(target[:-1]).strip() == CAPTION
    assert "".join(p.text for p in shown.labelled[:-1]).strip() == CAPTION
    assert len(shown.part("image")) == vlm.num_prefix_tokens == 16
    assert shown.style == style and shown.prompt == PROMPT

    # generation is fed the same context, without the target
    generation = vlmkit.explain(vlm)
    assert generation.positions == [p for p in shown.positions if p.part != "target"]
    assert not generation.labelled

    text = str(shown)
    assert f"format {style}" in text and "<image 0..15>" in text
    assert f"{shown.labelled[0].piece!r}" in text
    assert json.loads(json.dumps(shown.to_dict()))["positions"][0]["part"] == "before"


def test_chat_puts_the_image_in_the_user_turn_plain_after_the_start_token(llama):
    chat, plain = (
        vlmkit.explain(build(llama, "chat"), CAPTION),
        vlmkit.explain(build(llama, "plain"), CAPTION),
    )
    assert [p.piece for p in plain.part("before")] == ["<|im_start|>"]
    assert "".join(p.text for p in chat.part("before")).endswith("<|im_start|>user\n")
    assert "".join(p.text for p in chat.part("after")).startswith(PROMPT + "<|im_end|>")


def test_explain_takes_a_caption_example_and_refuses_other_things(llama):
    vlm = build(llama, "plain")
    example = vlmkit.CaptionExample(id="x", captions=[CAPTION, "another"], image=None)
    assert vlmkit.explain(vlm, example) == vlmkit.explain(vlm, CAPTION)
    with pytest.raises(TypeError, match="explain takes a caption, a CaptionExample or None, not a list"):
        vlmkit.explain(vlm, [CAPTION])


def test_cli_inspect_a_decoder_before_training(llama, tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli.main import app

    clip = tiny_encoder_checkpoint("clip", tmp_path / "clip", image_size=32)
    args = [
        "--decoder",
        "smollm",
        "--decoder-checkpoint",
        llama,
        "--encoder",
        "clip",
        "--encoder-checkpoint",
        clip,
    ]
    result = CliRunner().invoke(app, ["inspect", CAPTION, *args, "--prompt-format", "plain", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["style"] == "plain" and shown["caption"] == CAPTION
    parts = [p["part"] for p in shown["positions"]]
    assert parts.count("image") == shown["num_prefix_tokens"]
    assert [p["label"] is not None for p in shown["positions"]] == [part == "target" for part in parts]

    table = CliRunner().invoke(app, ["inspect", *args])
    assert table.exit_code == 0, table.output
    assert "<image 0.." in table.stdout and "the model writes the caption from here" in table.stdout

    refused = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path), "--prompt-format", "chat"])
    assert isinstance(refused.exception, ConfigError)
    assert (
        str(refused.exception)
        == "vlmkit inspect: --prompt-format: a saved model has its own; use them with --decoder"
    )
    renamed = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path), "--format", "chat"])
    assert renamed.exit_code == 2 and "renamed: use --prompt-format" in renamed.output
