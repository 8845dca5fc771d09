"""Caption metrics: pycocoevalcap's numbers, hand-checked, without hangs, and without Java.

Every score_captions call that includes METEOR starts a JVM that spends ~6 s loading METEOR's
paraphrase table, so tests that do not need METEOR ask for the other metrics only, and the
METEOR runs are shared through module-scoped fixtures.
"""

from __future__ import annotations

import io
import math
import shutil
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from vlmkit.core.errors import VlmkitError
from vlmkit.evaluate import metrics
from vlmkit.evaluate.metrics import (
    METRIC_NAMES,
    MetricsError,
    exact_match,
    format_metrics_table,
    score_captions,
    simple_tokenize,
)

pytest.importorskip("pycocoevalcap")
JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="java not on PATH")
NO_METEOR = [m for m in METRIC_NAMES if m != "METEOR"]

REFS = {
    "img1": ["A red circle on the left.", "A red round shape on the left side."],
    "img2": ["A blue square on the right.", "A blue box at the right."],
    "img3": ["A green triangle on the left.", "Green triangle, left side."],
    "img4": ["A yellow star on the right.", "A yellow star shape to the right."],
}
RIGHT = {k: v[0] for k, v in REFS.items()}
# Completely wrong.
WRONG = {
    "img1": "Purple elephants dance at midnight.",
    "img2": "",
    "img3": "bananas",
    "img4": "A cup of tea.",
}
# Mostly wrong, and awkward for the METEOR jar, which reads one line per caption and splits fields
# on "|||": pycocoevalcap's own Meteor wrapper waits for ever after a line break.
AWKWARD = {
    "img1": "Purple elephants\r\ndance ||| at midnight",
    "img2": "",
    "img3": "A green\u2028triangle,\non the left",
    "img4": "a yellow star ||| to the right (maybe)",
}


class _RecordingMeteor(metrics._MeteorProcess):
    instances: list[metrics._MeteorProcess] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.instances.append(self)


def _pycocoevalcap_scores(predictions, references):
    """What pycocoevalcap's COCOEvalCap does: PTB-tokenize gts and res, then run each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # its __del__ ends the jar
    scores = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    scores |= {"METEOR": meteor_score, "ROUGE-L": Rouge().compute_score(gts, res)[0]}
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def meteor_runs():
    """The runs that need the METEOR jar, side by side: each JVM needs ~6 s (one core) to start."""
    # pycocoevalcap's tokenizer would misalign captions on "\r" or "\u2028", so it gets AWKWARD
    # with every run of whitespace made one space, which is all our sanitizing does.
    sanitized = {k: " ".join(c.split()) for k, c in AWKWARD.items()}
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(3) as pool:
        mp.setattr(metrics, "_MeteorProcess", _RecordingMeteor)
        _RecordingMeteor.instances = []
        right = pool.submit(score_captions, RIGHT, REFS)
        awkward = pool.submit(score_captions, AWKWARD, REFS)
        theirs = pool.submit(_pycocoevalcap_scores, sanitized, REFS)
        return SimpleNamespace(
            right=right.result(),
            awkward=awkward.result(),
            theirs=theirs.result(),
            meteors=list(_RecordingMeteor.instances),
        )


# ------------------------------------------------------------------------- with Java (official)


@needs_java
def test_identical_predictions_score_perfectly(meteor_runs):
    # every caption has >= 4 tokens, so BLEU-4 has 4-grams to count (see the short-caption test)
    right = meteor_runs.right
    assert list(right) == list(METRIC_NAMES)
    assert right.tokenizer == "ptb"
    assert right.skipped == {}
    assert right.count == 4
    for n in range(1, 5):
        assert right[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert right["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    assert right["METEOR"] > 0.99
    assert right["CIDEr"] > 1.0


@needs_java
def test_wrong_predictions_score_lower_than_right(meteor_runs):
    right = meteor_runs.right
    wrong = score_captions(WRONG, REFS, metrics=NO_METEOR)  # METEOR: the mostly wrong set below
    for name in NO_METEOR:
        assert wrong[name] < right[name], name
    assert wrong["BLEU-4"] < 1e-3 and wrong["CIDEr"] < 0.1
    for name in METRIC_NAMES:
        assert meteor_runs.awkward[name] < right[name], name


@needs_java
def test_awkward_predictions_are_scored_and_meteor_is_closed(meteor_runs):
    # line breaks (\r\n, \u2028, \n), "|||", an empty prediction: no hang, no crash, and every
    # jar's process has ended when score_captions returns
    scores = meteor_runs.awkward
    assert list(scores) == list(METRIC_NAMES) and scores.skipped == {}
    assert 0 < scores["METEOR"] < 1
    assert len(meteor_runs.meteors) == 2
    for meteor in meteor_runs.meteors:
        assert meteor.proc.returncode is not None
        assert all(not r.is_alive() for r in meteor.readers)


@needs_java
def test_matches_pycocoevalcap_coco_pipeline(meteor_runs):
    ours, theirs = meteor_runs.awkward, meteor_runs.theirs
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name
    assert ours["CIDEr"] > 0.1 and ours["BLEU-2"] > 0.1


@needs_java
def test_bleu1_is_clipped_unigram_precision_times_brevity_penalty():
    # hyp "the the cat sat" (c = 4 words) vs ref "a cat sat on the mat" (r = 6 words):
    #   clipped unigram matches: the min(2, 1) = 1, cat 1, sat 1 -> p1 = 3/4
    #   brevity penalty: c < r -> exp(1 - r/c) = exp(1 - 6/4) = exp(-0.5)
    #   BLEU-1 = 0.75 * exp(-0.5) = 0.45490...
    # pycocoevalcap adds 1e-15 / 1e-9 to numerators / denominators, hence the tolerance
    # (ids of other images, here none, would pool their counts: BLEU is corpus-level)
    got = score_captions({"x": "the the cat sat"}, {"x": ["a cat sat on the mat"]}, metrics=["BLEU-1"])
    assert list(got) == ["BLEU-1"]
    assert got["BLEU-1"] == pytest.approx(0.75 * math.exp(-0.5), abs=1e-8)
    # with a second reference of 3 words, the "closest" reference length is 3 (|3-4| < |6-4|):
    # no brevity penalty, and clipping uses the highest count over the references ("the": 1)
    got = score_captions(
        {"x": "the the cat sat"}, {"x": ["a cat sat on the mat", "cat sat down"]}, ["BLEU-1"]
    )
    assert got["BLEU-1"] == pytest.approx(0.75, abs=1e-8)


@needs_java
def test_bleu4_collapses_when_no_caption_has_four_tokens():
    # pycocoevalcap does no smoothing: with zero 4-grams in the whole set, p4 = (0 + 1e-15) /
    # (0 + 1e-9) = 1e-6, so BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4) ~ 0.0316 for perfect captions
    short = {"a": "red circle left", "b": "blue square right"}
    got = score_captions(short, {k: [v] for k, v in short.items()}, metrics=NO_METEOR)
    assert got["BLEU-3"] == pytest.approx(1.0, abs=1e-6)
    assert got["BLEU-4"] == pytest.approx(1e-6**0.25, rel=1e-3)
    assert got["ROUGE-L"] == pytest.approx(1.0)


def _cider_d(hyps: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D written from its definition, independently of pycocoevalcap's code.

    For each n: g(s) = count of each n-gram in s x log(N / df), with df the number of images whose
    references contain the n-gram (at least 1) and N the number of images. The n-gram score of a
    candidate c against reference s is sum(min(g(c), g(s)) * g(s)) / (|g(c)| |g(s)|) (clipped
    cosine); the image score is 10 x mean over references of exp(-(len c - len s)^2 / 2 sigma^2)
    x mean over n of the n-gram scores; CIDEr-D is the mean over images.
    """

    def grams(words, k):
        return Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1))

    df = Counter()
    for rs in refs:
        df.update({g for r in rs for k in range(1, n + 1) for g in grams(r.split(), k)})

    def tfidf(words, k):
        return {g: c * (math.log(len(refs)) - math.log(max(1, df[g]))) for g, c in grams(words, k).items()}

    image_scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        total = 0.0
        for ref in rs:
            sims = []
            for k in range(1, n + 1):
                gc, gs = tfidf(hyp.split(), k), tfidf(ref.split(), k)
                norm_c = math.sqrt(sum(v * v for v in gc.values()))
                norm_s = math.sqrt(sum(v * v for v in gs.values()))
                dot = sum(min(v, gs.get(g, 0.0)) * gs.get(g, 0.0) for g, v in gc.items())
                sims.append(dot / (norm_c * norm_s) if norm_c and norm_s else 0.0)
            penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * sigma**2))
            total += penalty * sum(sims) / n
        image_scores.append(10 * total / len(rs))
    return sum(image_scores) / len(image_scores)


@needs_java
def test_cider_by_hand_on_two_images():
    # N = 2 images, so idf(g) = log 2 - log df(g).
    #   image 1: ref "a cat sat", hyp "a cat"     image 2: ref "a dog", hyp "a dog"
    #   "a" is in both images' references -> idf 0; every other n-gram -> idf log 2.
    # image 1: unigrams  hyp {a: 0, cat: L}, ref {a: 0, cat: L, sat: L} (L = log 2)
    #            cosine = L*L / (L * sqrt(2) L) = 1/sqrt 2
    #          bigrams   hyp {a cat: L}, ref {a cat: L, cat sat: L} -> 1/sqrt 2
    #          3-, 4-grams: the hypothesis has none -> 0
    #          length penalty: lengths differ by 1 -> exp(-1 / 72)
    #          score = 10 * exp(-1/72) * (2 / sqrt 2) / 4 = 3.4868...
    # image 2: unigram and bigram cosines 1, no 3/4-grams, same length -> 10 * 2/4 = 5
    #   (so even a perfect two-word caption scores 5, not 10)
    # CIDEr = (3.4868 + 5) / 2 = 4.2434...
    expected = (10 * math.exp(-1 / 72) * (2 / math.sqrt(2)) / 4 + 5.0) / 2
    got = score_captions({"1": "a cat", "2": "a dog"}, {"1": ["a cat sat"], "2": ["a dog"]}, ["CIDEr"])
    assert got["CIDEr"] == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(4.2434, abs=1e-4)


@needs_java
def test_cider_matches_independent_cider_d():
    # several references per image, repeated words (clipping), different lengths (penalty)
    refs = {
        "1": ["a dog runs on the grass", "the dog is running on green grass", "a brown dog runs"],
        "2": ["a man rides a red bike", "a person riding a bicycle"],
        "3": ["two cats sleep on a sofa", "cats sleeping on the couch"],
    }
    preds = {"1": "a dog a dog runs on grass", "2": "a man riding a bike", "3": "a cat on a sofa"}
    got = score_captions(preds, refs, metrics=["CIDEr"])
    expected = _cider_d(list(preds.values()), list(refs.values()))
    assert got["CIDEr"] == pytest.approx(expected, abs=1e-9)
    assert 0.5 < expected < 5


@needs_java
def test_cider_is_zero_on_a_single_image():
    # the IDF comes from the evaluated references: with one image every n-gram has df = N = 1
    got = score_captions({"1": "a red circle on the left"}, {"1": ["a red circle on the left"]}, ["CIDEr"])
    assert got["CIDEr"] == 0.0


@needs_java
def test_simple_tokenizer_matches_ptb_on_ordinary_captions():
    captions = [
        "A red circle on the left.",
        "Two dogs, one brown and one white, play in the snow!",
        "A man's hat isn't on his head; it's on the table.",
        "People walking down a street at night (with umbrellas).",
        'A sign that says "STOP" next to a well-known café: 3.5 km away?',
    ]
    ptb, _ = metrics._ptb_tokenize(JAVA, captions, [[]] * len(captions))
    assert [simple_tokenize(c) for c in captions] == ptb


# ------------------------------------------------------------------------------- without Java


def test_without_java_reports_non_java_metrics_and_the_tokenizer(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(UserWarning) as record:
        got = score_captions(RIGHT, REFS)
    assert len(record) == 1
    message = str(record[0].message)
    assert "java not found" in message and "METEOR skipped" in message and "Java runtime" in message
    assert "\n" not in message
    assert list(got) == NO_METEOR
    assert got.tokenizer == "simple"
    assert "METEOR" in got.skipped
    assert got["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and got["ROUGE-L"] == pytest.approx(1.0)
    assert got.describe()["tokenizer"] == "simple"


def test_without_java_metrics_that_need_none_warn_only_about_the_tokenizer(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(UserWarning, match="simple tokenizer") as record:
        got = score_captions(RIGHT, REFS, metrics=["CIDEr"])
    assert "METEOR" not in str(record[0].message)
    assert list(got) == ["CIDEr"] and got.skipped == {}


def _fake_java(tmp_path, meteor_behaviour: str) -> str:
    """A 'java' that runs the real PTB tokenizer but behaves badly as the METEOR jar."""
    script = tmp_path / "java"
    script.write_text(
        f'#!/bin/sh\ncase "$*" in *PTBTokenizer*) exec {JAVA} "$@";; esac\n{meteor_behaviour}\n'
    )
    script.chmod(0o755)
    return str(script)


@needs_java
def test_stuck_meteor_jar_is_skipped_with_a_warning_and_killed(tmp_path, monkeypatch):
    java = _fake_java(tmp_path, "exec sleep 60")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: java)
    monkeypatch.setattr(metrics, "METEOR_TIMEOUT_S", 0.5)
    monkeypatch.setattr(metrics, "_MeteorProcess", _RecordingMeteor)
    _RecordingMeteor.instances = []
    with pytest.warns(UserWarning, match="METEOR skipped: METEOR jar did not answer in time"):
        got = score_captions(RIGHT, REFS)
    assert list(got) == NO_METEOR and got.tokenizer == "ptb"
    assert "did not answer" in got.skipped["METEOR"]
    assert _RecordingMeteor.instances[0].proc.returncode is not None


def test_broken_java_falls_back_for_everything(tmp_path, monkeypatch):
    script = tmp_path / "java"
    script.write_text("#!/bin/sh\necho 'Error occurred during initialization of VM' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(script))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = score_captions(RIGHT, REFS)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("PTB tokenizer failed (exit code 1") for m in messages), messages
    assert any("METEOR skipped" in m and "initialization of VM" in m for m in messages), messages
    assert got.tokenizer == "simple" and list(got) == NO_METEOR


# ------------------------------------------------------------------------------- input checking


def test_missing_references_name_the_first_ids():
    preds = {f"img{i}": "a caption" for i in range(8)}
    with pytest.raises(MetricsError) as err:
        score_captions(preds, {"img0": ["a caption"]})
    message = str(err.value)
    assert isinstance(err.value, VlmkitError) and "\n" not in message
    assert message.startswith("7 prediction id(s) have no references: 'img1', 'img2'")
    assert "and 2 more" in message and "img7" not in message


def test_empty_reference_list_is_an_error():
    with pytest.raises(MetricsError, match="empty reference list: 'b'"):
        score_captions({"a": "x y", "b": "x y"}, {"a": ["x y"], "b": []})
    with pytest.raises(MetricsError, match="empty reference list"):
        exact_match({"a": "x"}, {"a": ["  \n"]})


def test_other_bad_inputs_are_errors():
    with pytest.raises(MetricsError, match="no predictions"):
        score_captions({}, {"a": ["x"]})
    with pytest.raises(MetricsError, match="unknown metric.*'SPICE'"):
        score_captions({"a": "x"}, {"a": ["x"]}, metrics=["SPICE"])
    with pytest.raises(MetricsError, match="must be strings"):
        score_captions({"a": None}, {"a": ["x"]})


def test_extra_references_are_ignored_and_a_bare_string_is_one_reference(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(UserWarning):
        got = score_captions({"a": "a red circle on the left"}, {"a": "a red circle on the left", "b": ["x"]})
    assert got.count == 1 and got["BLEU-1"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- exact match, table


def test_exact_match_ignores_case_whitespace_and_trailing_punctuation():
    refs = {"1": ["A red circle on the left.", "red disc, left"], "2": ["A blue square."], "3": ["A star."]}
    preds = {"1": "a  red circle\non the LEFT", "2": "A blue square!!", "3": "A star on the left."}
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert exact_match({"1": "red disc , left"}, refs) == 0.0  # inner punctuation still counts
    assert exact_match({"1": "Red disc, left..."}, refs) == 1.0


def test_metrics_table_has_a_column_per_run_and_marks_missing_values():
    from rich.console import Console

    step0 = metrics.CaptionScores({"BLEU-4": 0.1, "CIDEr": 0.25}, tokenizer="simple", count=3)
    trained = {"BLEU-4": 0.5, "METEOR": 0.4, "CIDEr": 2.5, "exact match": 1.0}
    table = format_metrics_table({"step 0": step0, "trained": trained}, title="shapes")
    console = Console(file=io.StringIO(), width=100)
    console.print(table)
    text = console.file.getvalue()
    assert [c.header for c in table.columns] == ["metric", "step 0", "trained"]
    rows = [line for line in text.splitlines() if "BLEU-4" in line or "METEOR" in line or "exact" in line]
    assert "0.100" in rows[0] and "0.500" in rows[0]
    assert "-" in rows[1] and "0.400" in rows[1]
    assert "exact match" in rows[2]
    assert "step 0: simple tokenizer" in text
