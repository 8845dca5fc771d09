"""What the language model is fed for one example: ``vlmkit.explain`` and ``vlmkit inspect``.

For a model (trained, loaded or freshly built) and one caption, the sequence exactly as training
builds it (``PrefixConditioningVLM.tokenize``, the same call the collator makes): each position's
part (``before``, ``image``, ``after``, ``target``; see ``vlmkit.core.model``), token id, piece
as the tokenizer writes it and decoded text, and the label trained there. Labels are set on the
target (caption + end token) only; a label at position ``i`` is predicted from position ``i - 1``.
Without a caption: what generation is fed, after which the model writes the caption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vlmkit.core.contracts import CaptionExample

PARTS = ("before", "image", "after", "target")


@dataclass
class Position:
    """One position of the sequence the LM sees."""

    index: int
    part: str
    #: ``None`` on the image slots: the projected image features are written there
    token_id: int | None
    #: the token as the tokenizer writes it (``Ġcat``, ``▁cat``), or ``<image i>``
    piece: str
    #: the token decoded alone (``" cat"``); empty on image slots
    text: str
    #: the id the loss trains here, or ``None`` (prefix, prompt, padding: never trained)
    label: int | None


@dataclass
class Explanation:
    """The sequence for one example; ``str()`` is a readable table, ``to_dict()`` JSON-able data."""

    decoder: str
    style: str
    prompt: str
    caption: str | None
    num_prefix_tokens: int
    stop_token_ids: list[int]
    positions: list[Position]

    def part(self, name: str) -> list[Position]:
        if name not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {name!r}")
        return [p for p in self.positions if p.part == name]

    @property
    def labelled(self) -> list[Position]:
        """The positions the loss is on: the caption's tokens and the end token."""
        return [p for p in self.positions if p.label is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        head = (
            f"decoder {self.decoder}, format {self.style}, prompt {self.prompt!r}, "
            f"{self.num_prefix_tokens} image slots, stop ids {self.stop_token_ids}"
        )
        rows = [head, f"{'pos':>5}  {'part':<7} {'id':>7}  {'piece':<24} {'text':<20} label"]
        image = self.part("image")
        for p in self.positions:
            if p.part == "image":
                if p is image[0]:
                    span = f"{image[0].index}-{image[-1].index}"
                    rows.append(f"{span:>5}  {'image':<7} {'-':>7}  <image 0..{len(image) - 1}>"
                                "   the projected image features (no token, no label)")  # fmt: skip
                continue
            label = "-" if p.label is None else ("trained" if p.label == p.token_id else str(p.label))
            rows.append(f"{p.index:>5}  {p.part:<7} {p.token_id:>7}  {p.piece!r:<24} {p.text!r:<20} {label}")
        if self.caption is None:
            rows.append("(generation: the model writes the caption from here, until a stop id)")
        else:
            rows.append(
                "(label 'trained': the loss predicts this token from the position before; '-': no loss)"
            )
        return "\n".join(rows)


def explain(model, example: str | CaptionExample | None = None, *, prompt: str | None = None) -> Explanation:
    """What ``model`` (a ``PrefixConditioningVLM``) is fed for ``example``: a caption, a
    ``CaptionExample`` (its first caption), or ``None`` for the generation context. ``prompt``
    defaults to the model's own."""
    if isinstance(example, CaptionExample):
        example = example.captions[0]
    if example is not None and not isinstance(example, str):
        raise TypeError(f"explain takes a caption, a CaptionExample or None, not a {type(example).__name__}")
    prompt = model.settings.prompt if prompt is None else prompt
    formatted = model.format(example, prompt)
    batch = model.tokenize([example], prompt=prompt, device="cpu")
    ids = batch.input_ids[0].tolist()
    labels = batch.labels[0].tolist() if batch.labels is not None else [None] * len(ids)
    k = model.num_prefix_tokens
    bounds = [len(formatted.before), k, len(formatted.after), len(formatted.target)]
    parts = [part for part, n in zip(PARTS, bounds, strict=True) for _ in range(n)]
    tokenizer = model.tokenizer
    positions = []
    for i, (token, label, part) in enumerate(zip(ids, labels, parts, strict=True)):
        trained = label if label is not None and label >= 0 else None
        if part == "image":
            positions.append(Position(i, part, None, f"<image {i - bounds[0]}>", "", trained))
        else:
            piece = tokenizer.convert_ids_to_tokens(token)
            positions.append(Position(i, part, token, str(piece), tokenizer.decode([token]), trained))
    resolve = getattr(model.decoder_spec, "resolve_style", None)
    style = resolve(tokenizer, model.settings.prompt_format) if resolve else model.settings.prompt_format
    return Explanation(
        decoder=model.settings.decoder,
        style=style,
        prompt=prompt,
        caption=example,
        num_prefix_tokens=k,
        stop_token_ids=list(model.stop_token_ids),
        positions=positions,
    )
