"""``vlmkit demo`` end to end, on tiny random models in place of the embedded weights.

The demo's point, that the embedded default learns, is shown by running it (docs/demo.md)
and by tests/test_real_weights.py; here the plumbing is tested: the recipe is valid and uses the
embedded weights, and the command scores before and after, saves the sample images it shows and
captions the scikit-image photos.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import vlmkit.recipes.demo as demo
from vlmkit.cli.main import app
from vlmkit.evaluate.metrics import METRIC_NAMES
from vlmkit.recipes import EMBEDDED_DEFAULT
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint


def test_the_recipe_trains_the_embedded_default(tmp_path):
    config = demo.demo_config(tmp_path / "out")
    assert (config.model.encoder, config.model.encoder_checkpoint) == EMBEDDED_DEFAULT["encoder"]
    assert (config.model.decoder, config.model.decoder_checkpoint) == EMBEDDED_DEFAULT["decoder"]
    assert [d.name for d in config.datasets] == ["scenes"]
    assert config.datasets[0].options["kinds"] == ["single"]  # the recipe QUALITY.md measured
    assert config.output == tmp_path / "out"
    assert demo.demo_config(tmp_path, max_steps=3).max_steps == 3
    # one evaluation of the loss, at the last step, whatever the number of steps
    assert config.eval_every == config.max_steps
    assert demo.demo_config(tmp_path, max_steps=3).eval_every == 3
    assert demo.demo_config(tmp_path, max_steps=3, eval_every=1).eval_every == 1
    assert demo.DemoConfig().seed == 0 == config.seed  # `vlmkit demo --seed N` reaches the recipe
    assert demo.demo_config(tmp_path, seed=2).seed == 2


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    encoder = tiny_encoder_checkpoint("siglip", tmp_path / "siglip", image_size=32)
    decoder = tiny_decoder_checkpoint("llama", tmp_path / "llama")
    recipe = {
        **demo.DEMO_SETTINGS,
        "model": {
            **demo.DEMO_SETTINGS["model"],
            "encoder": "siglip",
            "encoder_checkpoint": encoder,
            "decoder": "smollm",
            "decoder_checkpoint": decoder,
            "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 4},
            "max_caption_tokens": 6,
        },
        "datasets": [
            {
                "name": "scenes",
                "options": {"size": 60, "heldout_size": 6, "image_size": 48, "kinds": ["single"]},
            }
        ],
        "batch_size": 4,
        "save_every": 2,
        "eval_every": 2,
        "max_eval_samples": 4,
    }
    monkeypatch.setattr(demo, "DEMO_SETTINGS", recipe)
    return tmp_path


def test_vlmkit_demo_scores_before_and_after_shows_samples_and_photos(tiny_recipe, monkeypatch):
    out = tiny_recipe / "demo"
    monkeypatch.setenv("COLUMNS", "400")  # rich: one table row per line, paths unbroken
    monkeypatch.setattr(demo, "STEP0_SAMPLES", 3)  # the untrained model: the first 3 of the 5
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "2", "--test-samples", "5", "-q"])
    assert result.exit_code == 0, result.output
    text = result.output
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in text
    assert "(step 0) on 3 held-out compositions" in text
    assert "step 0, held-out (3)" in text and "step 2, held-out" in text and "step 2, seen" in text
    for name in (*METRIC_NAMES, "exact_match"):
        assert name in text
    assert "held-out compositions (5 scored; first 5 shown)" in text
    # the summary counts what the held-out predictions file holds
    rows = [json.loads(line) for line in (out / "eval-test" / "predictions.jsonl").open()]
    wrong = [r for r in rows if r["prediction"] not in r["references"]]
    assert f"held-out compositions: {len(rows) - len(wrong)}/5 exact;" in text
    assert f"of the {len(wrong)} wrong name the right objects with a wrong colour" in text
    # every sample image it lists was saved, and is one of the scored test images
    shown = sorted(out.glob("samples/*.png"))
    assert len(shown) == 5
    assert all(str(path) in text for path in shown)
    # scikit-image's three photos, each with a caption
    assert "real photos" in text
    for photo in demo.SKIMAGE_PHOTOS:
        assert f"skimage.data.{photo}" in text
    assert re.search(r"trained 2 steps in \d+ s", text)
    assert re.search(r"step 0 \d+ s, training \d+ s, scoring \d+ s, photos \d+ s", text)
    # the trained model is where the last line says, and scoring wrote its files
    assert (out / "vlmkit.json").is_file()
    assert (out / "eval-test" / "metrics.json").is_file()
    assert (out / "eval-test" / "predictions.jsonl").is_file()
    assert (out / "eval-seen" / "metrics.json").is_file()
