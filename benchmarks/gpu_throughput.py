"""Training throughput on one GPU (issue 13): samples/s, MFU and peak memory of vlmkit's training
step for a SmolLM2-135M-sized and a Qwen2.5-0.5B-sized decoder, next to the two upstream
architectures of ``benchmarks/train_throughput.py`` on the same card.

``--smoke`` runs the same code on the CPU (no GPU needed) with tiny decoders and a one-layer SigLIP
(196 x 32 features), batch 2, one step per run: it checks the script and fails unless every run
produced finite figures; its figures mean nothing. ``--json PATH``: one JSON line per run.

- Decoders: random weights of the real configs (``LlamaConfig``/``Qwen2Config`` with the published
  sizes and vocabularies, no hub), a small offline tokenizer; LoRA r16 on q,k,v,o as vlmkit's
  plugins set it; the frozen base in the training dtype, as ``vlmkit train`` loads it.
- Features: SigLIP-base-sized cached features, random, ``[B, 196, 768]`` (no reduction: a 196-token
  prefix) or ``[B, 16, 768]`` (avgpool to 16 tokens, stored reduced as the feature cache stores
  it). The encoder never runs in vlmkit's step. Captions of 30 target tokens, plain layout.
- Modes: fp32, tf32 (fp32 weights, TF32 matmuls), bf16 (autocast, frozen base in bf16), and bf16
  with gradient checkpointing (``--full``: every precision with and without it; ``--smoke``: fp32
  with and without it); batch 32 and 64.
- MFU: model FLOPs per sample (``train_throughput.lm_parts``: 2 x params x tokens forward, x3 for
  trained weights, x2 for frozen weights gradients flow through, plus attention; recomputation by
  gradient checkpointing not counted) x samples/s / the card's bf16 dense matmul peak, measured in
  this run (an 8192^3 matmul, best of 5).
- Upstream (``train_throughput.build_ved``/``build_prefix196``): VisionEncoderDecoder SigLIP-base +
  GPT-2 all trained, and SigLIP-in-the-step + 196-token prefix + SmolLM2-135M with full logits;
  batch 32, bf16 and tf32.

Every run: ``--warmup`` steps, then ``--steps`` timed steps between CUDA synchronisations; peak
memory is ``torch.cuda.max_memory_allocated`` over the run. A run that runs out of memory is
reported as OOM. Runs stop once ``--budget-s`` seconds have passed (the rest is reported as
skipped), so ``benchmarks/gpu_check.sh`` stays within its time.

    python benchmarks/gpu_throughput.py                    # on a CUDA GPU, ~3-5 min on an H100
    python benchmarks/gpu_throughput.py --smoke            # tiny decoders on the CPU, seconds: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import torch  # noqa: E402
import train_throughput as tt  # noqa: E402

#: the decoders measured (``harness.DECODERS``: their published sizes; tiny ones in --smoke)
DECODERS = ("SmolLM2-135M", "Qwen2.5-0.5B")
CAPTION_TOKENS = 30


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.parser(__doc__, threads=None)
    p.add_argument("--batch-sizes", default=None, help="comma list (default 32,64; smoke: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6; smoke: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke: 1)")
    p.add_argument("--full", action="store_true", help="every precision with and without checkpointing")
    p.add_argument("--no-upstream", action="store_true", help="skip the two upstream architectures")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no run after this many seconds")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2" if smoke else "32,64")).split(",")]
    args.steps = args.steps or (1 if smoke else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    return args


# ------------------------------------------------------------------------------------------ machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def peak_memory(device: torch.device):
    box = {"gib": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        box["gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def measure(step, batch: int, args, device: torch.device) -> dict:
    """samples/s and peak memory of ``step``, or the OOM."""
    try:
        with peak_memory(device) as mem:
            for _ in range(args.warmup):
                step()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            took = time.perf_counter() - start
        return {"samples_per_s": batch * args.steps / took, "peak_gib": mem["gib"]}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}


# ------------------------------------------------------------------------------------------ models


def vlmkit_model(decoder: str, lm_dir: str, siglip_dir: str, tokens: int, precision: str, device):
    """vlmkit's model as ``vlmkit train`` builds it for ``precision`` (the frozen base in bf16 for bf16)."""
    reduction = (
        {"reduction": "none"}
        if tokens == harness.SIGLIP_TOKENS
        else {"reduction": "avgpool", "tokens": tokens}
    )
    config = {
        "encoder": "siglip",
        "encoder_checkpoint": siglip_dir,
        "decoder": harness.DECODERS[decoder].plugin,
        "decoder_checkpoint": lm_dir,
        "projection": {"type": "mlp", **reduction},
        "format": "plain",
        "max_caption_tokens": 48,
    }
    torch.manual_seed(0)
    return harness.build_model(config, precision=precision, device=str(device))


def vlmkit_step(model, batch_size: int, tokens: int, precision: str, device):
    """The step ``vlmkit train`` takes on cached features, and its model FLOPs per sample."""
    from vlmkit.train.trainer import make_optimizer, optimizer_param_groups

    caption = tt.fixed_length_caption(model, CAPTION_TOKENS)
    batch = model.tokenize([caption] * batch_size, device=device).to_dict()
    dim = model.encoder.feature_dim  # 768 (SigLIP-base); 32 in the smoke run
    features = torch.randn(batch_size, tokens, dim, device=device, dtype=torch.float16)
    config = tt.train_settings(batch_size=batch_size)
    optimizer = make_optimizer(optimizer_param_groups(model, config))
    params = [p for group in model.trainable_parameter_groups().values() for p in group]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(**batch, features=features)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seq = batch["input_ids"].shape[1]
    targets = int((batch["labels"] != -100).sum(1).max())
    cfg = model.language_model.config
    parts = tt.lm_parts(cfg, seq, targets, projection=model.projection, prefix=model.num_prefix_tokens)
    return step, sum(part.train for part in parts), seq


def modes(full: bool, smoke: bool = False) -> list[tuple[str, bool]]:
    """(precision, gradient checkpointing) pairs; --smoke: fp32 with and without checkpointing (the
    CPU has no TF32, and bf16 without bf16 instructions is emulated)."""
    if smoke:
        return [("fp32", False), ("fp32", True)]
    if full:
        return [(p, gc) for p in ("fp32", "tf32", "bf16") for gc in (False, True)]
    return [("fp32", False), ("tf32", False), ("bf16", False), ("bf16", True)]


# ------------------------------------------------------------------------------------------ main


def row_name(row: dict) -> str:
    """A run's row name: model, features, precision (+ checkpointing), batch."""
    parts = [
        row["model"],
        row.get("features", "pixels 224 px"),
        row["precision"] + (" + ckpt" if row.get("checkpointing") else ""),
    ]
    return " | ".join([*parts, f"batch {row['batch']}"])


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA GPU (or --smoke to check the script on a CPU)")
    else:
        device = torch.device("cuda")
    out = harness.start(args, "gpu_throughput")
    tt.DEVICE = device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else harness.machine()["cpu"]
    n = 512 if args.smoke else 8192
    peak = harness.matmul_gflops("bfloat16", n=n, reps=5, device=device.type)[0] / 1e3
    print(f"{name}: bf16 matmul peak {peak:.3g} TFLOP/s (measured); torch {torch.__version__}", flush=True)
    out.row("bf16 matmul peak", device=name, tflops=peak, n=n)
    rows: list[dict] = []
    folder = harness.workdir("gpu-throughput")
    siglip_dir = harness.siglip_checkpoint(folder, tiny=args.smoke)  # 196 tokens
    width = 32 if args.smoke else 768
    tokens_list = (harness.SIGLIP_TOKENS, 16)

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    def record(row: dict) -> None:
        if "samples_per_s" in row:
            row["mfu"] = row["flops_per_sample"] * row["samples_per_s"] / (peak * 1e12)
        rows.append(row)
        out.row(row_name(row), **row)
        print(
            "  "
            + row_name(row)
            + ": "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
            flush=True,
        )

    lm_dirs = {}
    for decoder in DECODERS:
        lm_dirs[decoder] = harness.decoder_checkpoint(decoder, folder, tiny=args.smoke, dtype="bfloat16")
        for precision in sorted(
            {p for p, _ in modes(args.full, args.smoke)}, key=("fp32", "tf32", "bf16").index
        ):
            set_tf32(precision in ("tf32", "bf16"))  # bf16 runs what stays fp32 in TF32, as vlmkit train does
            for tokens in tokens_list:
                model = (
                    None
                    if over_budget()
                    else vlmkit_model(decoder, lm_dirs[decoder], siglip_dir, tokens, precision, device)
                )
                for gc in [gc for p, gc in modes(args.full, args.smoke) if p == precision]:
                    if gc and model is not None:
                        model.gradient_checkpointing_enable()
                    for batch_size in args.batch_sizes:
                        row = {
                            "model": f"vlmkit {decoder}",
                            "features": f"[B, {tokens}, {width}]",
                            "precision": precision,
                            "checkpointing": gc,
                            "batch": batch_size,
                        }
                        if model is None or over_budget():
                            record({**row, "skipped": True})
                            continue
                        step, flops, seq = vlmkit_step(model, batch_size, tokens, precision, device)
                        row.update(measure(step, batch_size, args, device), seq=seq, flops_per_sample=flops)
                        record(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not args.no_upstream:
        upstream(args, siglip_dir, lm_dirs["SmolLM2-135M"], device, over_budget, record)
    print(table(name, peak, rows))
    print(f"{time.perf_counter() - started:.0f} s")
    return out.finish([row_name(r) for r in rows])


def upstream(args, siglip_dir: str, lm_dir: str, device, over_budget, record) -> None:
    """The two upstream architectures of ``train_throughput.py`` at the first batch size."""
    batch_size = args.batch_sizes[0]
    ns = SimpleNamespace(batch_size=batch_size, caption_tokens=CAPTION_TOKENS, smoke=args.smoke)
    for key, build in (("ved", tt.build_ved), ("prefix196", tt.build_prefix196)):
        for precision in ("tf32",) if args.smoke else ("tf32", "bf16"):  # CPU bf16 can be 100x slower
            row = {
                "model": tt.LABELS[key],
                "precision": precision,
                "checkpointing": False,
                "batch": batch_size,
            }
            if over_budget():
                record({**row, "skipped": True})
                continue
            set_tf32(True)
            run = (
                build(ns, siglip_dir, precision) if key == "ved" else build(ns, siglip_dir, lm_dir, precision)
            )
            row.update(measure(run.step, batch_size, args, device), flops_per_sample=run.flops_per_sample)
            record(row)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()


def table(device: str, peak: float, rows: list[dict]) -> str:
    lines = [
        f"### {device}: bf16 matmul peak {peak:.3g} TFLOP/s (measured in this run)",
        "",
        "| model | features | precision | grad. ckpt | batch | samples/s | MFU | peak memory |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("skipped"):
            speed, mfu, mem = "skipped (time budget)", "", ""
        elif r.get("oom"):
            speed, mfu, mem = "OOM", "", ""
        else:
            speed, mfu = f"{r['samples_per_s']:.1f}", f"{100 * r['mfu']:.1f}%"
            mem = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "n/a (CPU)"
        lines.append(
            f"| {r['model']} | {r.get('features', 'pixels 224 px')} | {r['precision']} | "
            f"{'yes' if r.get('checkpointing') else 'no'} | {r.get('batch', '')} | {speed} | {mfu} | {mem} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
