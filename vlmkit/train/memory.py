"""How much GPU memory a training step needs: the formula behind docs/training.md's table.

    total = frozen weights  (LM + encoder parameters x 2 bytes in bf16/fp16, 4 in fp32/tf32)
          + trained tensors (LoRA + projection: fp32 weight, gradient and AdamW's two moments, 16 B each)
          + activations     (batch x sequence x layers x A, A = bytes each decoder layer keeps per token
                             for backward; with gradient checkpointing only each layer's input,
                             batch x sequence x layers x hidden x dtype bytes, plus one layer's A)
          + the LM head     (caption positions x vocabulary x 6 bytes: 16-bit logits + fp32 for the loss)
          + OVERHEAD_GIB    (CUDA context, allocator slack, kernels' workspaces)

``A`` is measured, not guessed: ``activation_bytes_per_token`` runs one and two decoder layers of the
real width (random weights, LoRA r16 on q,k,v,o, SDPA attention, autocast as in training) on the
CPU at two sequence lengths and counts the bytes autograd saves
(``torch.autograd.graph.saved_tensors_hooks``), leaving out the parameters it saves (the frozen
weights a matmul keeps for the input's gradient: counted once, in the weights term). The
difference of two layers and one is one layer's; the difference of two lengths is per token, so
what a layer saves once per step (autocast's 16-bit copies of the fp32 LoRA weights) drops out.
Everything else is arithmetic on the configs. The result is an
estimate, labelled as computed wherever it is shown; ``benchmarks/gpu_throughput.py`` reports the
measured peak on a real card.

    python benchmarks/memory_table.py    # docs/training.md's table (a few seconds of CPU per decoder)
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
#: CUDA context (~0.3-0.5 GiB), cuBLAS workspaces and allocator fragmentation
OVERHEAD_GIB = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Estimate:
    """Bytes by part; ``total`` adds ``OVERHEAD_GIB``."""

    weights: float
    trained: float
    activations: float
    head: float
    overhead: float = OVERHEAD_GIB * GIB

    @property
    def total(self) -> float:
        return self.weights + self.trained + self.activations + self.head + self.overhead


def _lora_model(config, precision: str = "fp32", device: str = "cpu"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        if precision in ("bf16", "fp16"):  # the frozen base in the training dtype, as vlmkit train loads it
            model = model.to(torch.bfloat16)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
        return get_peft_model(model, lora)


def saved_activation_bytes(model, batch: int, tokens: int, precision: str) -> int:
    """Bytes autograd keeps for backward in one forward of ``model``'s decoder layers (each storage
    counted once), the input embeddings requiring grad as the trained prefix makes them. The
    model's own parameters are not activations: a saved weight is left out."""
    import torch

    width = model.get_base_model().config.hidden_size
    embeds = torch.randn(batch, tokens, width, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("bf16", "fp16"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.get_base_model().get_decoder()(inputs_embeds=embeds, use_cache=False)
    return sum(seen.values())


def activation_bytes_per_token(config, precision: str = "bf16") -> float:
    """A: the bytes one decoder layer of ``config`` keeps per token for backward, measured on the
    CPU as the difference of two layers and one, and of 48 tokens and 16 (a small vocabulary: the
    layers never see it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch, lengths, per_layer = 2, (16, 48), []
        for tokens in lengths:
            measured = []
            for layers in (1, 2):
                sizes = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # one per layer
                small = type(config)(**{**sizes, "num_hidden_layers": layers, "vocab_size": 256})
                model = _lora_model(small, precision)
                measured.append(saved_activation_bytes(model, batch, tokens, precision))
            per_layer.append(measured[1] - measured[0])
    finally:
        torch.set_num_threads(threads)
    return (per_layer[1] - per_layer[0]) / (batch * (lengths[1] - lengths[0]))


def estimate(
    config,
    *,
    batch: int,
    tokens: int,
    caption_tokens: int = 30,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    encoder_params: int = 0,
    feature_dim: int = 768,
    per_token: float | None = None,
) -> Estimate:
    """Training memory of a decoder of ``config`` with LoRA r16 on q,k,v,o, a frozen encoder of
    ``encoder_params`` parameters (on the GPU with the model) and an MLP projection from
    ``feature_dim`` features, at ``batch`` rows of ``tokens`` positions (prefix + prompt +
    caption). ``per_token``: A when known (else measured)."""
    import torch

    with torch.device("meta"):  # parameter counts without allocating them
        model = _lora_model(config, device="meta")
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, layers = config.hidden_size, config.num_hidden_layers
    projection = 2 * feature_dim + feature_dim * h + h + h * h + h
    half = precision in ("bf16", "fp16")
    a = per_token if per_token is not None else activation_bytes_per_token(config, precision)
    rows = batch * tokens
    # checkpointing keeps each layer's input, and one layer's activations while it is recomputed
    activations = (
        rows * (layers * h * (2 if half else 4) + a) if gradient_checkpointing else rows * layers * a
    )
    return Estimate(
        weights=(frozen + encoder_params) * (2 if half else 4),
        trained=16 * (lora + projection),  # fp32 weight, gradient, AdamW's two moments
        activations=activations,
        head=batch * caption_tokens * config.vocab_size * ((2 if half else 4) + 4),  # logits + fp32 loss
    )
