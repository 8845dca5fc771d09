"""``vlmkit inspect``: what the language model is fed for one caption (``vlmkit.explain``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect_command(
    caption: str = typer.Argument(
        None, help="A caption, shown as training feeds it (default: the generation context alone)."
    ),
    model: Path = typer.Option(None, "--model", "-m", help="A model folder written by 'vlmkit train'."),
    decoder: str = typer.Option(None, "--decoder", help="Or a decoder plugin, for a model not trained yet."),
    decoder_checkpoint: str = typer.Option(
        None, "--decoder-checkpoint", help="Its checkpoint (with --decoder)."
    ),
    encoder: str = typer.Option(
        None, "--encoder", help="The encoder plugin (with --decoder; default: the embedded default's)."
    ),
    encoder_checkpoint: str = typer.Option(
        None, "--encoder-checkpoint", help="Its checkpoint (with --encoder)."
    ),
    prompt: str = typer.Option(None, "--prompt", help="Prompt text (default: the model's, or none)."),
    format_: str = typer.Option(
        None, "--format", help="auto (chat template when there is one), chat or plain (with --decoder)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: every position with its part and label."),
) -> None:
    """Show what the LM is fed for one caption: token ids, pieces, image slots, labelled positions.

    The sequence exactly as training builds it (vlmkit.explain): the image prefix between the
    prompt's parts, labels on the caption and the end token only.
    """
    if (model is None) == (decoder is None):
        raise typer.BadParameter(
            "give exactly one of --model PATH or --decoder NAME", param_hint="--model/--decoder"
        )
    fresh = {"--decoder-checkpoint": decoder_checkpoint, "--encoder": encoder, "--encoder-checkpoint": encoder_checkpoint,
             "--format": format_}  # fmt: skip
    if model is not None and any(v is not None for v in fresh.values()):
        given = ", ".join(k for k, v in fresh.items() if v is not None)
        raise typer.BadParameter(
            f"{given}: a saved model has its own; use them with --decoder", param_hint=given
        )

    import vlmkit
    from vlmkit.core.explain import explain

    if model is not None:
        vlm = vlmkit.load(model)
    else:
        from vlmkit.core.model import PrefixConditioningVLM
        from vlmkit.recipes import embedded_default

        config = {"decoder": decoder, "decoder_checkpoint": decoder_checkpoint, "encoder": encoder,
                  "encoder_checkpoint": encoder_checkpoint, "format": format_ or "auto", "prompt": prompt or ""}  # fmt: skip
        vlm = PrefixConditioningVLM.build(embedded_default({"model": config})["model"])
    explanation = explain(vlm, caption, prompt=prompt)
    typer.echo(json.dumps(explanation.to_dict(), indent=2) if as_json else str(explanation))
