"""Write the web export's decoder format (``vlmkit.runtime.web_decoder`` describes it and why).

``unsupported(lm)`` says why an LM cannot use it (the export then writes onnxruntime-web graphs
for the decoder, and says so); ``write_decoder`` packs the LoRA-merged float32 LM into
``decoder.bin`` and returns the manifest's ``web.decoder`` section. What the format computes is
the Llama block (RMSNorm, rotary attention with grouped key/value heads, SiLU-gated MLP), with or
without q/k/v biases. ``unsupported`` reads the structure (module names and settings, not a list of
families), and the export checks the packed format against PyTorch's logits before publishing
(``check_decoder``): a family that looks the same and computes something else fails there.

The int8 values of the layers' matrices are chosen by error-compensating rounding
(``vlmkit.export.rounding``) where ``write_decoder`` is given ``hessians``: the second moments of
each matrix's inputs while the float model captions calibration images (``calibrate``). The
token-embedding table (the LM head too when tied) keeps nearest rounding: it is looked up as well as
multiplied, and its rounding did not move the demo model's captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.core.errors import ExportError
from vlmkit.runtime import web_decoder as fmt

#: the largest difference of the format's logits from PyTorch's, relative to their largest
#: magnitude, that the export accepts: int8 weights and int16 activations give ~0.04 on SmolLM2;
#: a block the format computes differently (another norm, rotary layout, activation) gives ~1
TOLERANCE = 0.1


def unsupported(lm) -> str | None:
    """Why ``lm`` (a merged float causal LM) cannot run as the web decoder format, or None."""
    config = lm.config
    family = f"model_type {config.model_type!r}"
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not hasattr(lm.model, "norm"):
        return f"{family}: no model.layers and model.norm"
    if getattr(config, "hidden_act", None) != "silu":
        return f"{family}: hidden_act {getattr(config, 'hidden_act', None)!r}, not silu"
    rope = getattr(lm.model, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") != "default":
        return f"{family}: rotary embeddings other than the default"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return f"{family}: sliding-window attention"
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")):
        return f"{family}: layers without input and post-attention norms"
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return f"{family}: attention without q/k/v/o projections"
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return f"{family}: an MLP without gate/up/down projections"
    if attn.o_proj.bias is not None or any(
        getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
    ):
        return f"{family}: biases outside q/k/v"
    sizes = (config.hidden_size, config.intermediate_size, attn.head_dim * config.num_attention_heads)
    if any(s % fmt.BLOCK for s in sizes):
        return f"{family}: sizes {sizes} not multiples of {fmt.BLOCK}"
    return None


#: the layers' matrices, as ``decoder.bin`` names them, and where each sits in a Llama block
MATRICES = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
            ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
            ("down", "mlp.down_proj"))  # fmt: skip


def calibrate(vlm, lm, images, *, batch: int = 16) -> dict[str, torch.Tensor]:
    """The second moments ``X^T X`` (float64 ``[K, K]``) of the inputs of each of ``lm``'s layer
    matrices (named as ``decoder.bin`` names them, ``layers.3.down``) while ``lm`` (``vlm``'s
    decoder, merged) reads ``images``' prompts and the greedy captions ``vlm`` gives them: what
    ``vlmkit.export.rounding`` weighs each matrix's output error by."""
    hessians: dict[str, torch.Tensor] = {}
    rows = {"mask": None}

    def record(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[rows["mask"]].float()
            product = (x.T @ x).double()
            hessians[name] = hessians[name] + product if name in hessians else product

        return hook

    hooks = [
        lm.model.layers[i].get_submodule(path).register_forward_pre_hook(record(f"layers.{i}.{key}"))
        for i in range(len(lm.model.layers))
        for key, path in MATRICES
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                chunk = list(images[start : start + batch])
                pixels = vlm.preprocess(chunk).float()
                captions = vlm.generate(pixel_values=pixels)
                tokens = vlm.tokenize(captions)
                embeds = vlm.embed(tokens.input_ids, tokens.image_mask, vlm.projection(vlm.encode(pixels)))
                rows["mask"] = tokens.attention_mask.reshape(-1).bool()
                lm(inputs_embeds=embeds, attention_mask=tokens.attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return hessians


def write_decoder(
    lm,
    embed: np.ndarray,
    folder: Path,
    *,
    name: str = "decoder.bin",
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Pack ``lm`` (merged, float32) and its token-embedding table ``embed`` ``[V, D]`` (what the
    runtimes look ids up in) into ``folder/name``; returns the manifest's ``web.decoder``.
    ``hessians`` (``calibrate``'s): round the layers' matrices by error compensation, not to the
    nearest step."""
    from vlmkit.export.rounding import error_compensated

    hessians = hessians or {}
    config = lm.config
    head = lm.get_output_embeddings().weight.detach().float().numpy()
    tied = head.shape == embed.shape and np.array_equal(head, embed)
    tensors: dict[str, Any] = {}
    offset = 0
    with open(folder / name, "wb") as out:

        def put(key: str, array: np.ndarray) -> None:
            nonlocal offset
            array = np.ascontiguousarray(array)
            pad = -offset % 16  # 16-byte aligned, so the page views every tensor in place
            out.write(b"\0" * pad)
            offset += pad
            out.write(array.tobytes())
            tensors[key] = {
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "offset": offset,
                "bytes": array.nbytes,
            }
            offset += array.nbytes

        def matrix(key: str, weight) -> None:
            w = weight.detach().float().numpy() if isinstance(weight, torch.Tensor) else weight
            if key in hessians:
                q, s = error_compensated(w, hessians[key], block=fmt.BLOCK, maximum=fmt.WEIGHT_MAX)
            else:
                q, s = fmt.quantize_weight(w)
            put(f"{key}.q", q)
            put(f"{key}.s", s)

        matrix("embed", embed)
        if not tied:
            matrix("lm_head", head)
        put("norm", lm.model.norm.weight.detach().float().numpy())
        for i, layer in enumerate(lm.model.layers):
            put(f"layers.{i}.input_norm", layer.input_layernorm.weight.detach().float().numpy())
            put(f"layers.{i}.post_norm", layer.post_attention_layernorm.weight.detach().float().numpy())
            for key, path in MATRICES:
                linear = layer.get_submodule(path)
                matrix(f"layers.{i}.{key}", linear.weight)
                if linear.bias is not None:
                    put(f"layers.{i}.{key}.bias", linear.bias.detach().float().numpy())
    attn = lm.model.layers[0].self_attn
    rope = lm.model.rotary_emb
    return {
        "runtime": "vlmkit-wasm",
        "file": name,
        "bytes": offset,
        "block": fmt.BLOCK,
        "rounding": "error-compensated" if hessians else "nearest",
        "architecture": {
            "model_type": config.model_type,
            "layers": len(lm.model.layers),
            "hidden": int(config.hidden_size),
            "intermediate": int(config.intermediate_size),
            "heads": int(config.num_attention_heads),
            "kv_heads": int(config.num_key_value_heads),
            "head_dim": int(attn.head_dim),
            "vocab": int(embed.shape[0]),
            "rms_eps": float(lm.model.norm.variance_epsilon),
            "scaling": float(attn.scaling),
            "inv_freq": [float(f) for f in rope.inv_freq.float().tolist()],
            "rope_scaling": float(getattr(rope, "attention_scaling", 1.0)),
            "tied": bool(tied),
        },
        "tensors": tensors,
    }


def check_decoder(lm, folder: Path, manifest: dict[str, Any], *, positions: int = 6) -> float:
    """The format's logits (``WebDecoder``) after each of ``positions`` random tokens against
    PyTorch's: the largest difference relative to the largest logit; ``ExportError`` past
    ``TOLERANCE`` (a family quirk the format does not compute shows here, not in the page)."""
    decoder = fmt.WebDecoder(folder, manifest)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, decoder.embed.shape[0], (1, positions), generator=g)
    embeds = torch.from_numpy(decoder.embed[ids[0].numpy()].copy())[None]
    with torch.no_grad():
        want = lm(inputs_embeds=embeds).logits[0].float().numpy()
    cache = decoder.new_cache()
    got = np.stack([decoder.step(x, i, cache) for i, x in enumerate(embeds[0].numpy())])
    worst = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
    if not worst <= TOLERANCE:
        raise ExportError(
            f"the web decoder format differs from PyTorch by {worst:.2g} (relative; tolerance {TOLERANCE}): "
            f"this {lm.config.model_type} decoder computes something the format does not"
        )
    return worst


def caption_agreement(
    vlm, folder: Path, manifest: dict[str, Any], images, *, threshold: float
) -> dict[str, Any]:
    """Greedy captions of ``images`` by the packed format (``WebDecoder``, fed the PyTorch image
    prefix) and by the float PyTorch model: the manifest's ``checks.caption_agreement``. Its logits
    check (``check_decoder``) misses what this catches: an error of 0.05 that flips a near-tie,
    after which the rest of the caption differs."""
    decoder = fmt.WebDecoder(folder, manifest)
    limit = vlm.settings.max_caption_tokens
    with torch.no_grad():
        pixels = vlm.preprocess(list(images)).float()
        want = vlm.generate(pixel_values=pixels, return_ids=True, max_new_tokens=limit)
        prefixes = vlm.projection(vlm.encode(pixels)).numpy()
    tokens = vlm.tokenize([None])
    ids, slots = tokens.input_ids[0].numpy(), tokens.image_mask[0].numpy()
    differ = []
    for i, prefix in enumerate(prefixes):
        prompt = decoder.embed_ids(ids).copy()
        prompt[slots] = prefix.reshape(-1, prompt.shape[-1])
        if decoder.greedy(prompt, limit, vlm.stop_token_ids) != list(want[i]):
            differ.append(i)
    return {
        "variant": "int8 web decoder",
        "vs": "fp32 PyTorch",
        "images": len(prefixes),
        "identical": len(prefixes) - len(differ),
        "threshold": threshold,
    }
