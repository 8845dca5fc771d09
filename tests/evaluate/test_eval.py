"""``vlmkit eval`` and ``vlmkit train --eval-metrics`` end to end on a tiny random model.

The captions of a random model are nonsense; what is tested is the plumbing: which examples are
captioned, what is written where, which metrics are reported. Scoring with Java (the PTB tokenizer
and METEOR) costs 5-15 s per evaluation, so only ``vlmkit eval`` itself runs it; elsewhere Java is
hidden and vlmkit falls back to its pure-Python tokenizer without METEOR.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from vlmkit.cli.main import app
from vlmkit.core.artifact import MANIFEST
from vlmkit.core.errors import ArtifactError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.evaluate.metrics import METRIC_NAMES
from vlmkit.sdk.datasets import load_split
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint
from vlmkit.train.config import DatasetConfig

SHAPES = {"size": 72, "image_size": 32}  # 24 images per split
MAX_EVAL_SAMPLES = 4
METRICS = (*METRIC_NAMES, "exact_match")
WITHOUT_JAVA = tuple(name for name in METRICS if name != "METEOR")


def hide_java(monkeypatch) -> None:
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    )


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def home(vlmkit_home):
    """This module's ``VLMKIT_HOME`` (see conftest)."""
    return vlmkit_home


@pytest.fixture(scope="module")
def trained(tmp_path_factory, home):
    """A model trained with ``--eval-metrics``, and the batch sizes of every ``generate`` call."""
    root = tmp_path_factory.mktemp("eval")
    encoder = tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32)
    decoder = tiny_decoder_checkpoint("llama", root / "llama")
    out = root / "model"
    batches: list[int] = []
    generate = PrefixConditioningVLM.generate

    def counting_generate(self, *args, **kwargs):
        captions = generate(self, *args, **kwargs)
        batches.append(len(captions))
        return captions

    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="java not found"):
        mp.setattr(PrefixConditioningVLM, "generate", counting_generate)
        hide_java(mp)
        result = cli(
            "train",
            "--encoder", "siglip", "--encoder-checkpoint", encoder,
            "--decoder", "smollm", "--decoder-checkpoint", decoder,
            "--dataset", "shapes:size={size},image_size={image_size}".format(**SHAPES),
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "4",
            "--eval-metrics", "--set", f"max_eval_samples={MAX_EVAL_SAMPLES}",
            "--set", "model.max_caption_tokens=6",
            "--output", str(out), "--quiet",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"out": out, "generated": batches}


def test_eval_metrics_during_training_are_logged(trained):
    records = [json.loads(line) for line in (trained["out"] / "logs.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4]  # one evaluation; the end of training reuses it
    for name in WITHOUT_JAVA:
        assert isinstance(evals[0][f"eval_{name}"], float), name
    # and the final scores go into the manifest
    manifest = json.loads((trained["out"] / MANIFEST).read_text())
    assert manifest["training"]["eval"]["eval_CIDEr"] == evals[0]["eval_CIDEr"]


def test_eval_metrics_caption_at_most_max_eval_samples(trained):
    # one evaluation, at step 4: max_eval_samples images, not the whole validation split (24)
    assert sum(trained["generated"]) == MAX_EVAL_SAMPLES


def test_vlmkit_eval_writes_predictions_and_metrics_and_prints_a_table(trained):
    model = trained["out"]
    result = cli("eval", "--model", str(model), "--split", "test", "--max-samples", "8")
    assert result.exit_code == 0, result.output
    folder = model / "eval-test"

    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all(set(row) == {"id", "prediction", "references"} for row in rows)
    assert all(isinstance(row["prediction"], str) and row["references"] for row in rows)

    # the dataset and seed come from the model's manifest: the first 8 of that test split
    expected = load_split([DatasetConfig(name="shapes", options=SHAPES)], "test")
    assert [row["id"] for row in rows] == [expected[i].id for i in range(8)]
    assert [row["references"] for row in rows] == [list(expected[i].captions) for i in range(8)]

    record = json.loads((folder / "metrics.json").read_text())
    assert list(record["metrics"]) == list(METRICS)
    assert all(0.0 <= record["metrics"][name] <= 10.0 for name in METRICS)
    assert record["count"] == 8 and record["split"] == "test"
    assert record["datasets"] == [{"name": "shapes", "options": SHAPES}]

    for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert name in result.stdout  # the table goes to stdout
    assert "8 captions" in " ".join(result.output.replace("│", " ").split())


def test_vlmkit_eval_json_a_chosen_dataset_and_folder_and_no_java(trained, tmp_path, monkeypatch):
    hide_java(monkeypatch)
    with pytest.warns(UserWarning, match="java not found"):
        result = cli(
            "eval",
            "--model", str(trained["out"]),
            "--dataset", "shapes:size=96,image_size=32",
            "--split", "validation", "--max-samples", "3", "--json", "-o", str(tmp_path / "scores"),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)) == list(WITHOUT_JAVA)
    rows = [json.loads(line) for line in (tmp_path / "scores" / "predictions.jsonl").read_text().splitlines()]
    expected = load_split([DatasetConfig(name="shapes", options={"size": 96})], "validation")
    assert [row["id"] for row in rows] == [expected[i].id for i in range(3)]
    record = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert record["tokenizer"] == "simple" and "METEOR" in record["skipped"]


def test_vlmkit_eval_refuses_what_is_not_a_model_or_a_split(tmp_path, trained):
    with pytest.raises(ArtifactError, match="not a vlmkit model"):
        cli("eval", "--model", str(tmp_path))
    result = cli("eval", "--model", str(trained["out"]), "--split", "dev")
    assert result.exit_code == 2 and "'train', 'validation', 'test'" in " ".join(
        result.output.replace("│", " ").split()
    )
    renamed = cli("eval", "--model", str(trained["out"]), "--out", str(tmp_path / "x"))
    assert renamed.exit_code == 2 and "renamed: use --output (-o)" in " ".join(
        renamed.output.replace("│", " ").split()
    )
