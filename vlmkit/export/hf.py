"""``vlmkit export --format hf``: the decoder with its LoRA merged, as a plain transformers checkpoint.

The folder holds ``decoder/`` (weights, tokenizer and chat template: no peft needed), the
projection weights, the trained encoder layers if any, and ``vlmkit-hf.json`` naming the encoder
plugin; ``vlmkit.load`` rebuilds a captioner from it through ``vlmkit.core.artifact.assemble``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlmkit.core import __version__
from vlmkit.core.artifact import MERGED_FORMAT, MERGED_MANIFEST, MERGED_VERSION, state
from vlmkit.core.artifact import manifest as manifest_of
from vlmkit.core.paths import write_json
from vlmkit.export.onnx import merged_decoder
from vlmkit.export.steps import step


def write_merged(vlm, folder: Path, *, source, on_step) -> dict[str, Any]:
    """Write the merged export of ``vlm`` into ``folder``."""
    from safetensors.torch import save_file

    step(on_step, "merging LoRA into a copy of the decoder")
    lm = merged_decoder(vlm)
    step(on_step, "saving the merged decoder (transformers format)")
    lm.save_pretrained(str(folder / "decoder"))
    vlm.tokenizer.save_pretrained(str(folder / "decoder"))
    save_file(state(vlm.projection), str(folder / "projection.safetensors"))
    files = {"decoder": "decoder", "projection": "projection.safetensors", "encoder": None}
    encoder_weights = vlm.encoder_weights()  # trained encoder layers, even in a model loaded frozen
    if encoder_weights:
        save_file(encoder_weights, str(folder / "encoder.safetensors"))
        files["encoder"] = "encoder.safetensors"
    base_manifest = manifest_of(vlm)
    formatted = vlm.format(None)
    manifest = {
        "format": MERGED_FORMAT,
        "format_version": MERGED_VERSION,
        "vlmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source or {},
        "config": base_manifest["config"],
        "encoder": base_manifest["encoder"],
        "decoder": {**base_manifest["decoder"], "merged": "decoder"},
        "prefix_tokens": vlm.num_prefix_tokens,
        "stop_token_ids": list(vlm.stop_token_ids),
        "tokens": {
            "before": list(formatted.before),
            "after": list(formatted.after),
            "pad_id": int(vlm.pad_token_id),
        },
        "files": files,
    }
    write_json(folder / MERGED_MANIFEST, manifest)
    return {}
