"""Options several commands share, so that their help reads the same everywhere."""

from __future__ import annotations

import typer

DEVICES = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
PRECISIONS = (
    "auto (bf16 on CUDA where supported, else fp16; on a CPU the faster of fp32 and bf16, measured), "
    "fp32, tf32, bf16 or fp16"
)


def device_option(default: str | None = "auto", note: str = ""):
    return typer.Option(default, "--device", help=f"{DEVICES}{note}.")


def precision_option(default: str | None = "auto"):
    return typer.Option(default, "--precision", help=f"{PRECISIONS}.")
