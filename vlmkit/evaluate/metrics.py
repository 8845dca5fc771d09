"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), computed with ``pycocoevalcap``.

``score_captions`` does what ``pycocoevalcap``'s ``COCOEvalCap`` does (PTB-tokenize, then run each
scorer on the tokenized captions) without its traps:

* The Java parts (the Stanford PTB tokenizer and METEOR) run through our own small subprocess
  calls on the jars ``pycocoevalcap`` ships, with the same command lines. Its wrappers write a
  temporary file into site-packages (fails when that is read-only), let Java print to our stderr,
  silently misalign captions at a line break other than a plain newline (a carriage return,
  U+2028), and its ``Meteor`` fails or waits for ever when a caption holds a line break; its
  ``__del__`` then deadlocks on a lock that the failed call never released. Ours sanitize the
  text, check line counts, have a deadline and always close the process.
* Without ``java`` on PATH the scores that need no Java (BLEU, ROUGE-L, CIDEr) are still computed,
  on a pure-Python tokenizer that mimics PTB's lower-casing and punctuation removal, with one
  warning line. The result records which tokenizer was used.

SPICE is not offered: it needs Stanford CoreNLP models that are downloaded on first use.

Scale is ``pycocoevalcap``'s: BLEU, METEOR and ROUGE-L in 0..1, CIDEr unscaled (0..10, ~1 is good).
Java start-up dominates the cost: about 6 s for any number of captions (METEOR loads its
paraphrase table), which overlaps with tokenization and the Python scorers.

This module imports nothing heavy at import time; ``pycocoevalcap`` is imported inside functions.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from vlmkit.core.errors import VlmkitError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.table import Table

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
#: tokenizer names recorded in ``CaptionScores.tokenizer``
PTB_TOKENIZER = "ptb"
SIMPLE_TOKENIZER = "simple"

#: METEOR gives up (and is skipped with a warning) after this plus so much per caption; it needs
#: ~6 s to start and ~2 ms per caption, so only a stuck jar comes near it
METEOR_TIMEOUT_S = 120.0
METEOR_TIMEOUT_PER_CAPTION_S = 0.05

_INSTALL_JAVA = (
    "install a Java runtime (e.g. 'apt-get install default-jre-headless') for the official metrics"
)


class MetricsError(VlmkitError):
    """Predictions and references cannot be scored (missing or empty references, unknown metric)."""


class CaptionScores(dict[str, float]):
    """``{metric name: score}``, plus how the scores were obtained.

    ``tokenizer`` is ``"ptb"`` (pycocoevalcap's Stanford PTB tokenizer, the official one) or
    ``"simple"`` (the pure-Python stand-in used without Java; scores differ slightly from official
    COCO numbers). ``skipped`` maps each requested metric that could not be computed to why.
    """

    def __init__(
        self,
        scores: Mapping[str, float],
        *,
        tokenizer: str,
        skipped: Mapping[str, str] | None = None,
        count: int,
    ):
        super().__init__(scores)
        self.tokenizer = tokenizer
        self.skipped = dict(skipped or {})
        self.count = count

    def describe(self) -> dict:
        """A JSON-ready summary (for ``--json``)."""
        return {
            "metrics": dict(self),
            "tokenizer": self.tokenizer,
            "skipped": self.skipped,
            "count": self.count,
        }


# ----------------------------------------------------------------------------------- public API


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Iterable[str] | None = None,
) -> CaptionScores:
    """Score one predicted caption per image against that image's reference captions.

    ``predictions`` maps an image id to the generated caption; ``references`` maps image ids to
    one or more human captions (ids without a prediction are ignored). ``metrics`` picks a subset
    of ``METRIC_NAMES`` (default: all). Returns a ``CaptionScores`` dict of corpus-level scores,
    exactly as ``pycocoevalcap`` reports them: BLEU is corpus BLEU (n-gram counts summed over all
    images, "closest" reference length), METEOR its aggregate over all segments, ROUGE-L and CIDEr
    the mean of per-image scores.

    CIDEr is CIDEr-D as ``pycocoevalcap.cider.Cider`` computes it (clipped TF-IDF n-gram cosine,
    n=1..4, Gaussian length penalty with sigma=6, times 10). Its IDF comes from the reference
    captions of the images being scored, so a CIDEr number depends on the evaluated set: it is
    comparable only between runs on the same images, and on a single image it is always 0 (every
    n-gram then has IDF log(1/1)).

    Predictions are sanitized first: line breaks and runs of whitespace become one space, and an
    empty prediction simply scores (near) zero. Raises ``MetricsError`` when a prediction has no
    references, a reference list is empty, or a metric name is unknown. Never fails for want of
    Java: METEOR is then skipped with one warning (see ``CaptionScores.skipped``).
    """
    wanted = _check_metric_names(metrics)
    ids, hyps, refs = _validated(predictions, references)
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise MetricsError("caption metrics need pycocoevalcap; pip install 'vlmkit[eval]'")

    java = shutil.which("java")
    meteor = None
    skipped: dict[str, str] = {}
    if "METEOR" in wanted:
        if java is None:
            skipped["METEOR"] = "java not found on PATH"
        else:
            # Started first: the jar spends ~6 s loading its paraphrase table, which overlaps with
            # tokenization and the pure-Python scorers below.
            try:
                meteor = _MeteorProcess(java, len(ids))
            except _JavaFailure as exc:
                skipped["METEOR"] = str(exc)
                warnings.warn(f"METEOR skipped: {exc}", stacklevel=2)
    try:
        tokenizer = PTB_TOKENIZER
        tok_hyps, tok_refs = None, None
        if java is None:
            tokenizer = SIMPLE_TOKENIZER
            warnings.warn(
                f"java not found on PATH: {_skip_note(skipped)}captions tokenized with vlmkit's simple "
                f"tokenizer instead of PTB (scores differ slightly from official numbers); {_INSTALL_JAVA}",
                stacklevel=2,
            )
        else:
            try:
                tok_hyps, tok_refs = _ptb_tokenize(java, hyps, refs)
            except _JavaFailure as exc:
                tokenizer = SIMPLE_TOKENIZER
                warnings.warn(
                    f"PTB tokenizer failed ({exc}); captions tokenized with vlmkit's simple tokenizer "
                    "instead (scores differ slightly from official numbers)",
                    stacklevel=2,
                )
        if tok_hyps is None:
            tok_hyps = [simple_tokenize(h) for h in hyps]
            tok_refs = [[simple_tokenize(r) for r in rs] for rs in refs]

        scores = _python_scores(wanted, tok_hyps, tok_refs)
        if meteor is not None:
            try:
                scores["METEOR"] = meteor.score(tok_hyps, tok_refs)
            except _JavaFailure as exc:
                skipped["METEOR"] = str(exc)
                warnings.warn(f"METEOR skipped: {exc}", stacklevel=2)
    finally:
        if meteor is not None:
            meteor.close()
    ordered = {name: float(scores[name]) for name in METRIC_NAMES if name in scores}
    return CaptionScores(ordered, tokenizer=tokenizer, skipped=skipped, count=len(ids))


def exact_match(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """Fraction of predictions equal to at least one of their references.

    Comparison ignores case, runs of whitespace and trailing punctuation, so "A red circle." matches
    "a red  circle". Raises ``MetricsError`` like ``score_captions``.
    """
    _, hyps, refs = _validated(predictions, references)
    hits = sum(_normalize(h) in {_normalize(r) for r in rs} for h, rs in zip(hyps, refs, strict=True))
    return hits / len(hyps)


def format_metrics_table(
    metrics_by_column: Mapping[str, Mapping[str, float]], title: str | None = None
) -> Table:
    """A rich table with one row per metric and one column per run (e.g. "step 0", "trained").

    Metrics appear in ``METRIC_NAMES`` order, then any extra keys (e.g. "exact match") in the order
    first seen; a metric a run lacks shows as "-". When a column was scored with the simple
    tokenizer (no Java), the table caption says so.
    """
    from rich.table import Table

    rows = [m for m in METRIC_NAMES if any(m in col for col in metrics_by_column.values())]
    for col in metrics_by_column.values():
        rows += [k for k in col if k not in rows]
    table = Table(title=title)
    table.add_column("metric")
    for name in metrics_by_column:
        table.add_column(name, justify="right")
    for metric in rows:
        cells = [_format_value(col.get(metric)) for col in metrics_by_column.values()]
        table.add_row(metric, *cells)
    simple = [
        n for n, c in metrics_by_column.items() if getattr(c, "tokenizer", PTB_TOKENIZER) != PTB_TOKENIZER
    ]
    if simple:
        table.caption = f"{', '.join(simple)}: simple tokenizer (no Java), not official numbers"
    return table


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer as ``pycocoevalcap`` uses it (when Java is missing).

    Lower-cases, splits off clitics ("don't" -> "do n't", "dog's" -> "dog 's") and symbols, and
    drops the punctuation tokens pycocoevalcap drops. Matches PTB on ordinary captions; may differ
    on abbreviations ("u.s.") and repeated punctuation ("!!").
    """
    text = _sanitize(text).lower()
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)
    tokens = []
    for token in _SIMPLE_TOKEN.findall(text):
        token = _BRACKETS.get(token, token)
        if not _PUNCTUATION.fullmatch(token):
            tokens.append(token)
    return " ".join(tokens)


# ------------------------------------------------------------------------------------ helpers

# a word (letters/digits, joined by - . / inside: "well-known", "3.5", "a/b"), a clitic, or one symbol
_SIMPLE_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./]\w+)*|[^\w\s]")
# PTB writes brackets as -LRB- etc. and lower-cases them, so pycocoevalcap keeps them as words
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PUNCTUATION = re.compile(r"[.?!,:;'\"`-]+")


def _sanitize(text: str) -> str:
    # str.split() also splits on \r, \v, \f, \x85, \u2028: any of them would make the Java tools
    # (which read one caption per line) see two captions and go out of step with us.
    return " ".join(text.split())


def _normalize(text: str) -> str:
    return re.sub(r"[\s.!?,;:]+$", "", " ".join(text.lower().split()))


def _format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _skip_note(skipped: Mapping[str, str]) -> str:
    return f"{', '.join(skipped)} skipped, " if skipped else ""


def _check_metric_names(metrics: Iterable[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return METRIC_NAMES
    wanted = tuple(metrics)
    unknown = [m for m in wanted if m not in METRIC_NAMES]
    if unknown:
        raise MetricsError(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METRIC_NAMES)}"
        )
    return wanted


def _first(ids: Sequence, n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _validated(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[list, list[str], list[list[str]]]:
    """ids, sanitized predictions and their references, in prediction order; or ``MetricsError``."""
    if not predictions:
        raise MetricsError("no predictions to score")
    ids = list(predictions)
    missing = [i for i in ids if i not in references]
    if missing:
        raise MetricsError(f"{len(missing)} prediction id(s) have no references: {_first(missing)}")
    bad = [i for i in ids if not isinstance(predictions[i], str)]
    if bad:
        raise MetricsError(f"predictions must be strings; not for id(s) {_first(bad)}")
    refs = []
    for i in ids:
        rs = references[i]
        rs = [rs] if isinstance(rs, str) else list(rs)  # one bare string is one reference, not its letters
        if not all(isinstance(r, str) for r in rs):
            raise MetricsError(f"references must be strings; not for id {i!r}")
        refs.append([_sanitize(r) for r in rs])
    empty = [i for i, rs in zip(ids, refs, strict=True) if not any(rs)]
    if empty:
        raise MetricsError(f"{len(empty)} prediction id(s) have an empty reference list: {_first(empty)}")
    return ids, [_sanitize(predictions[i]) for i in ids], refs


def _python_scores(wanted: Sequence[str], hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """BLEU, ROUGE-L and CIDEr with pycocoevalcap's own scorers (pure Python) on tokenized text."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {k: [h] for k, h in enumerate(hyps)}
    gts = dict(enumerate(refs))
    scores: dict[str, float] = {}
    if any(m.startswith("BLEU") for m in wanted):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n + 1}": bleu[n] for n in range(4)})
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    if "CIDEr" in wanted:
        # pycocoevalcap's Cider fails (max() of nothing) when no reference has a single word left
        # after tokenization, e.g. references made of punctuation only; no n-gram can match then
        has_words = any(r for rs in refs for r in rs)
        scores["CIDEr"] = Cider().compute_score(gts, res)[0] if has_words else 0.0
    return {k: v for k, v in scores.items() if k in wanted}


class _JavaFailure(Exception):
    """A Java tool did not answer as expected (turned into a warning, never raised to callers)."""


def _ptb_tokenize(java: str, hyps: list[str], refs: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """pycocoevalcap's PTB tokenization (same jar, flags and punctuation list), through stdin."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    lines = hyps + [r for rs in refs for r in rs]
    cmd = [java, "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer"]
    cmd += ["-preserveLines", "-lowerCase"]
    try:
        done = subprocess.run(
            cmd,
            cwd=os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
            input="".join(line + "\n" for line in lines).encode("utf-8"),
            capture_output=True,
            timeout=120 + len(lines) / 100,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _JavaFailure(f"{type(exc).__name__}: {exc}") from None
    out = done.stdout.decode("utf-8", errors="replace").split("\n")
    if out and out[-1] == "":
        out.pop()
    if done.returncode != 0 or len(out) != len(lines):
        tail = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise _JavaFailure(
            f"exit code {done.returncode}, {len(out)} lines for {len(lines)} captions: {tail[0][:200]}"
        )
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    tokens = [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation) for line in out]
    tok_hyps, rest = tokens[: len(hyps)], iter(tokens[len(hyps) :])
    return tok_hyps, [[next(rest) for _ in rs] for rs in refs]


class _MeteorProcess:
    """The METEOR 1.5 jar in ``-stdio`` mode, as pycocoevalcap's ``Meteor`` runs it, made safe.

    Protocol (one line in, one line out): ``SCORE ||| ref1 ||| ... ||| hyp`` answers a line of
    sufficient statistics; ``EVAL ||| stats1 ||| ... ||| statsN`` answers N segment scores and then
    the aggregate score. A thread reads the answers into a queue so every read has a deadline,
    another drains stderr so the jar never blocks on a full pipe, and ``close`` always ends the
    process.
    """

    def __init__(self, java: str, count: int):
        from pycocoevalcap.meteor import meteor

        cmd = [java, "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=os.path.dirname(os.path.abspath(meteor.__file__)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise _JavaFailure(f"cannot start java: {exc}") from None
        self.deadline = time.monotonic() + METEOR_TIMEOUT_S + count * METEOR_TIMEOUT_PER_CAPTION_S
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.stderr: collections.deque[str] = collections.deque(maxlen=5)
        stdout_reader = (self.proc.stdout, self.answers.put, True)
        stderr_reader = (self.proc.stderr, self.stderr.append, False)
        self.readers = [
            threading.Thread(target=_read_lines, args=a, daemon=True) for a in (stdout_reader, stderr_reader)
        ]
        for reader in self.readers:
            reader.start()

    def score(self, hyps: list[str], refs: list[list[str]]) -> float:
        stats = []
        for hyp, rs in zip(hyps, refs, strict=True):
            # "|||" separates fields; pycocoevalcap strips it from hypotheses only, we from both
            fields = [r.replace("|||", " ") for r in rs] + [hyp.replace("|||", " ")]
            answer = self._ask(" ||| ".join(["SCORE", *fields]))[0]
            if not _METEOR_STATS.fullmatch(answer):  # e.g. "Error: ...": EVAL would then never answer
                raise _JavaFailure(f"METEOR jar answered {answer[:100]!r} to a SCORE line")
            stats.append(answer)
        answers = self._ask(" ||| ".join(["EVAL", *stats]), count=len(stats) + 1)
        try:
            return float(answers[-1])
        except ValueError:
            raise _JavaFailure(f"METEOR jar answered {answers[-1][:100]!r}, not a score") from None

    def _ask(self, line: str, count: int = 1) -> list[str]:
        try:
            self.proc.stdin.write((line + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:
            raise self._exited("METEOR jar stopped reading input") from None
        out = []
        for _ in range(count):
            try:
                got = self.answers.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                raise _JavaFailure("METEOR jar did not answer in time") from None
            if got is None:
                raise self._exited("METEOR jar exited")
            out.append(got)
        return out

    def _exited(self, what: str) -> _JavaFailure:
        """The jar is gone (e.g. too little memory for -Xmx2G): report its exit code and last words."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        self.readers[1].join(timeout=2)  # the stderr reader: let it collect the jar's last message
        last = self.stderr[-1][:200] if self.stderr else "no message"
        return _JavaFailure(f"{what} (exit code {self.proc.returncode}): {last}")

    def close(self) -> None:
        """End the jar (it exits at once on end of input; killed if it does not within 2 s)."""
        with contextlib.suppress(OSError):  # broken pipe when the jar already died
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self.readers:  # they see end of file once the process is gone
            reader.join(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()


_METEOR_STATS = re.compile(r"[0-9.eE+-]+( [0-9.eE+-]+)*")


def _read_lines(stream, put, signal_end: bool) -> None:
    for raw in stream:
        put(raw.decode("utf-8", errors="replace").strip())
    if signal_end:
        put(None)  # tells _ask that the jar is gone
