"""Training throughput on one GPU (issue 13): samples/s, MFU and peak memory of vlmkit's training
step for a SmolLM2-135M-sized and a Qwen2.5-0.5B-sized decoder, next to the two upstream
architectures of ``benchmarks/train_throughput.py`` on the same card.

``--cpu-smoke`` runs the same code on the CPU with tiny decoders and a one-layer SigLIP (196 x 32
features): it checks the script, its figures mean nothing.

- Decoders: random weights of the real configs (``LlamaConfig``/``Qwen2Config`` with the published
  sizes and vocabularies, no hub), a small offline tokenizer; LoRA r16 on q,k,v,o as vlmkit's
  plugins set it; the frozen base in the training dtype, as ``vlmkit train`` loads it.
- Features: SigLIP-base-sized cached features, random, ``[B, 196, 768]`` (no reduction: a 196-token
  prefix) or ``[B, 16, 768]`` (avgpool to 16 tokens, stored reduced as the feature cache stores
  it). The encoder never runs in vlmkit's step. Captions of 30 target tokens, plain layout.
- Modes: fp32, tf32 (fp32 weights, TF32 matmuls), bf16 (autocast, frozen base in bf16), and bf16
  with gradient checkpointing (``--full``: every precision with and without it); batch 32 and 64.
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
    python benchmarks/gpu_throughput.py --cpu-smoke        # tiny decoders on the CPU, seconds: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import train_throughput as tt  # noqa: E402

QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
)
#: --cpu-smoke: the same code on decoders of this size (the vocabulary is the tokenizer's)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)
#: name -> (vlmkit decoder plugin, transformers config class, sizes, tokenizer style)
DECODERS = {
    "SmolLM2-135M": ("smollm", "LlamaConfig", tt.SMOLLM2_135M, "smollm"),
    "Qwen2.5-0.5B": ("qwen2", "Qwen2Config", QWEN25_05B, "chatml"),
}
CAPTION_TOKENS = 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny decoders, batch 2, one step, on the CPU")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 32,64; smoke: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6; smoke: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke: 1)")
    p.add_argument("--full", action="store_true", help="every precision with and without checkpointing")
    p.add_argument("--no-upstream", action="store_true", help="skip the two upstream architectures")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no run after this many seconds")
    p.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2" if smoke else "32,64")).split(",")]
    args.steps = args.steps or (1 if smoke else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    return args


# ------------------------------------------------------------------------------------------ machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device, n: int, reps: int = 5) -> float:
    """TFLOP/s of an ``n``-square bf16 matmul on ``device``, best of ``reps``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


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


def decoder_checkpoint(name: str, folder: Path, smoke: bool) -> str:
    """A random decoder of ``name``'s real config (``TINY`` in the smoke run) with a small tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    from vlmkit.testing.tiny_decoders import tiny_tokenizer

    _, config_class, sizes, style = DECODERS[name]
    path = folder / name
    tokenizer = tiny_tokenizer(style, path)
    sizes = {**TINY, "vocab_size": len(tokenizer)} if smoke else sizes
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = getattr(transformers, config_class)(**sizes, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def tiny_siglip(folder: Path) -> Path:
    """--cpu-smoke: a one-layer SigLIP of width 32 at 224 px / patch 16 (196 tokens, like base)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    path = folder / "siglip-tiny-224"
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def vlmkit_model(decoder: str, lm_dir: str, siglip_dir: Path, tokens: int, precision: str, device):
    from vlmkit.core.config import ModelConfig
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.train.trainer import prepare_model_for_precision

    reduction = (
        {"reduction": "none"} if tokens == tt.SIGLIP_TOKENS else {"reduction": "avgpool", "tokens": tokens}
    )
    config = ModelConfig(
        encoder="siglip",
        encoder_checkpoint=str(siglip_dir),
        decoder=DECODERS[decoder][0],
        decoder_checkpoint=lm_dir,
        projection={"type": "mlp", **reduction},
        format="plain",
        max_caption_tokens=48,
    )
    dtype = {"bf16": "bfloat16"}.get(precision, "float32")
    torch.manual_seed(0)
    model = PrefixConditioningVLM.build(config, seed=0, dtype=dtype).to(device)
    prepare_model_for_precision(model, precision, device.type)
    return model.train()


def vlmkit_step(model, batch_size: int, tokens: int, precision: str, device):
    """The step ``vlmkit train`` takes on cached features, and its model FLOPs per sample."""
    from vlmkit.train.config import TrainConfig
    from vlmkit.train.trainer import make_optimizer, optimizer_param_groups

    caption = tt.fixed_length_caption(model, CAPTION_TOKENS)
    batch = model.tokenize([caption] * batch_size, device=device).to_dict()
    dim = model.encoder.feature_dim  # 768 (SigLIP-base); 32 in the smoke run
    features = torch.randn(batch_size, tokens, dim, device=device, dtype=torch.float16)
    config = TrainConfig(datasets=[{"name": "shapes"}], batch_size=batch_size)
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


def modes(full: bool) -> list[tuple[str, bool]]:
    """(precision, gradient checkpointing) pairs."""
    if full:
        return [(p, gc) for p in ("fp32", "tf32", "bf16") for gc in (False, True)]
    return [("fp32", False), ("tf32", False), ("bf16", False), ("bf16", True)]


# ------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA GPU (or --cpu-smoke to check the script on a CPU)")
    else:
        device = torch.device("cuda")
    tt.DEVICE = device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    peak = bf16_peak(device, 512 if args.cpu_smoke else 8192)
    print(f"{name}: bf16 matmul peak {peak:.3g} TFLOP/s (measured); torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    folder = Path(tempfile.mkdtemp(prefix="vlmkit-gpu-throughput-"))
    siglip_dir = tiny_siglip(folder) if args.cpu_smoke else tt.siglip_checkpoint(folder)  # 196 x 768
    tokens_list = (tt.SIGLIP_TOKENS, 16)

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    lm_dirs = {}
    for decoder in DECODERS:
        lm_dirs[decoder] = decoder_checkpoint(decoder, folder, args.cpu_smoke)
        for precision in sorted({p for p, _ in modes(args.full)}, key=("fp32", "tf32", "bf16").index):
            set_tf32(precision in ("tf32", "bf16"))  # bf16 runs what stays fp32 in TF32, as vlmkit train does
            for tokens in tokens_list:
                if over_budget():
                    rows.append({"model": f"vlmkit {decoder}", "precision": precision, "skipped": True})
                    continue
                model = vlmkit_model(decoder, lm_dirs[decoder], siglip_dir, tokens, precision, device)
                for gc in [gc for p, gc in modes(args.full) if p == precision]:
                    if gc:
                        model.gradient_checkpointing_enable()
                    for batch_size in args.batch_sizes:
                        row = {
                            "model": f"vlmkit {decoder}",
                            "features": f"[B, {tokens}, {768 if not args.cpu_smoke else 32}]",
                            "precision": precision,
                            "checkpointing": gc,
                            "batch": batch_size,
                        }
                        if over_budget():
                            rows.append({**row, "skipped": True})
                            continue
                        step, flops, seq = vlmkit_step(model, batch_size, tokens, precision, device)
                        row.update(measure(step, batch_size, args, device), seq=seq, flops_per_sample=flops)
                        rows.append(report(row, peak))
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not args.no_upstream:
        rows += upstream(args, siglip_dir, lm_dirs["SmolLM2-135M"], peak, device, over_budget)
    result = {
        "device": name,
        "bf16_peak_tflops": peak,
        "torch": torch.__version__,
        "cpu_smoke": args.cpu_smoke,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def upstream(args, siglip_dir: Path, lm_dir: str, peak: float, device, over_budget) -> list[dict]:
    """The two upstream architectures of ``train_throughput.py`` at the first batch size."""
    batch_size = args.batch_sizes[0]
    ns = SimpleNamespace(batch_size=batch_size, caption_tokens=CAPTION_TOKENS)
    if args.cpu_smoke:  # the tiny decoder is not SmolLM2-135M; the check is for real runs
        tt.check_lm_config = lambda config: None
    rows = []
    for key, build in (("ved", tt.build_ved), ("prefix196", tt.build_prefix196)):
        for precision in ("tf32",) if args.cpu_smoke else ("tf32", "bf16"):  # CPU bf16 can be 100x slower
            row = {
                "model": tt.LABELS[key],
                "precision": precision,
                "checkpointing": False,
                "batch": batch_size,
            }
            if over_budget():
                rows.append({**row, "skipped": True})
                continue
            set_tf32(True)
            run = (
                build(ns, siglip_dir, precision) if key == "ved" else build(ns, siglip_dir, lm_dir, precision)
            )
            row.update(measure(run.step, batch_size, args, device), flops_per_sample=run.flops_per_sample)
            rows.append(report(row, peak))
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def report(row: dict, peak: float) -> dict:
    if "samples_per_s" in row:
        row["mfu"] = row["flops_per_sample"] * row["samples_per_s"] / (peak * 1e12)
    print(
        "  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
        flush=True,
    )
    return row


def table(result: dict) -> str:
    lines = [
        f"### {result['device']}: bf16 matmul peak {result['bf16_peak_tflops']:.3g} TFLOP/s (measured in this run)",
        "",
        "| model | features | precision | grad. ckpt | batch | samples/s | MFU | peak memory |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
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
    main(parse_args())
