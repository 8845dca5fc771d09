"""Model artifacts: ``assemble``, the one function that builds a model (fresh, from a saved
folder, from a merged export: two paths that "do the same" drift apart), and those folders.

The model class is handed in (``PrefixConditioningVLM.build``/``load`` pass themselves): the model
module uses this one, and this one never imports it.

A saved model: ``vlmkit.json`` (manifest: versions, plugins, checkpoints, projection, format,
training config, encoder fingerprint, the prompt's token ids), ``projection.safetensors``,
``adapter/`` (peft's LoRA format) and, when encoder layers were trained, ``encoder.safetensors``.
Base weights are referenced, not copied. A merged export (``vlmkit export --format hf``) holds
``vlmkit-hf.json``, the LoRA-merged decoder in ``decoder/`` and the same projection file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmkit.core import __version__, paths
from vlmkit.core.config import ModelConfig, encoder_options, validate_model_config
from vlmkit.core.errors import ArtifactError, PluginError
from vlmkit.core.lm import add_lora, check_generate_takes_embeddings, token_embedding_scale
from vlmkit.core.paths import write_json, writing
from vlmkit.core.placement import torch_dtype

log = logging.getLogger(__name__)

MANIFEST = "vlmkit.json"
ARTIFACT_FORMAT = "vlmkit-model"
ARTIFACT_VERSION = 1
MERGED_MANIFEST = "vlmkit-hf.json"
MERGED_FORMAT = "vlmkit-hf"
MERGED_VERSION = 1


def assemble(
    model_class,
    config: ModelConfig | dict | None,
    *,
    registry=None,
    adapter: str | Path | None = None,
    merged: bool = False,
    projection: str | Path | None = None,
    encoder_weights: str | Path | None = None,
    trainable: bool = True,
    seed: int | None = 0,
    dtype: str | None = None,
    encoder_dtype: str | None = None,
):
    """Build a ``model_class`` (``PrefixConditioningVLM``) through the registry.

    - fresh (the default): new LoRA on the decoder, a projection initialised with ``seed``;
    - ``adapter``: the LoRA adapter folder to load instead (``trainable`` keeps it trainable);
    - ``merged=True``: the decoder checkpoint already has LoRA merged in: no adapter at all.

    ``projection`` and ``encoder_weights`` are safetensors files to load into the projection and
    the encoder (the trained encoder layers). ``dtype`` (default float32): the frozen base weights'
    (decoder, wholly frozen encoder); LoRA and the projection stay float32 (peft's adapters too).
    ``encoder_dtype`` (default ``dtype``): the frozen encoder's alone; training keeps it float32 so
    that the features it caches do not depend on the run's precision.
    """
    import torch
    from safetensors.torch import load_file

    from vlmkit.core.projection import build_projection
    from vlmkit.core.registry import get_registry

    config = validate_model_config(config)
    encoder_name, decoder_name = config.plugins()
    registry = registry or get_registry()
    encoder_spec = registry.encoder(encoder_name)
    decoder_spec = registry.decoder(decoder_name)
    extra = encoder_options(encoder_spec, config)  # {} without options: load(checkpoint, revision=)
    encoder = encoder_spec.load(config.encoder_checkpoint, revision=config.encoder_revision, **extra)
    half = dtype not in (None, "float32")
    encoder_dtype = encoder_dtype or dtype
    if encoder_dtype not in (None, "float32") and not config.unfreeze_encoder_layers:
        encoder.to(torch_dtype(encoder_dtype))  # trained encoder layers keep fp32 weights
    load_dtype = {"dtype": dtype} if half else {}  # third-party specs without a dtype still work in fp32
    base, tokenizer = decoder_spec.load(
        config.decoder_checkpoint, revision=config.decoder_revision, **load_dtype
    )
    # what vlmkit needs of the LM, checked before any training (vlmkit.core.lm)
    check_generate_takes_embeddings(base, decoder_name)
    embedding_scale = token_embedding_scale(base, _block_classes(decoder_spec, base), decoder_name)
    if merged:
        lm = base
    elif adapter is not None:
        from peft import PeftModel

        with _quiet_peft(), _fitting(Path(adapter)):
            lm = PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    else:
        lm = _add_lora(base, decoder_spec, config)
    if seed is not None:
        torch.manual_seed(seed)
    proj = build_projection(
        config.projection, encoder.feature_dim, base.get_input_embeddings().embedding_dim, encoder.grid
    )
    if projection is not None:
        with _fitting(Path(projection)):
            proj.load_state_dict(load_file(str(projection)))
    model = model_class(
        config, encoder, encoder_spec, decoder_spec, lm, tokenizer, proj, embedding_scale=embedding_scale
    )
    model.freeze_encoder(config.unfreeze_encoder_layers)
    if encoder_weights is not None:
        tensors = load_file(str(encoder_weights))
        missing = set(tensors) - set(encoder.state_dict())
        if missing:
            raise ArtifactError(f"{encoder_weights} holds weights the encoder lacks: {sorted(missing)[:3]}")
        encoder.load_state_dict(tensors, strict=False)
    return model


def _block_classes(decoder_spec, base) -> list[str]:
    """The transformer block's class name(s): the plugin's, else the model's own."""
    resolve = getattr(decoder_spec, "resolve_layer_class", None)
    declared = [resolve(base)] if resolve is not None else [decoder_spec.layer_class]
    return [c for c in (*declared, *(getattr(base, "_no_split_modules", None) or ())) if c]


@contextlib.contextmanager
def _fitting(file: Path) -> Iterator[None]:
    """Weights that do not fit the model the manifest describes (another LoRA rank, another
    projection type: a folder edited, or mixed from two models) as one ``ArtifactError`` line."""
    try:
        yield
    except RuntimeError as exc:  # torch's "size mismatch" / "Unexpected key(s)", with a long list
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise ArtifactError(
            f"{file} does not fit the model that {MANIFEST} describes ({detail[:200]}); the folder was "
            "changed, or mixed from two models: save or train it again"
        ) from exc


def _add_lora(base, decoder_spec, config: ModelConfig):
    from peft import LoraConfig

    lora_args = dict(decoder_spec.lora_kwargs(base, config.lora.targets))
    targets = lora_args["target_modules"]
    names = {name for n, _ in base.named_modules() for name in (n, n.rsplit(".", 1)[-1])}
    if not targets or not set(targets) <= names:  # a spec's promise, checked: peft's error is a traceback
        raise PluginError(
            f"LoRA targets {sorted(set(targets) - names) or targets} match no module of the "
            f"{decoder_spec.name!r} model; set lora.targets to module names it has"
        )
    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, **lora_args
    )
    return add_lora(base, lora, decoder_spec.name)


@contextlib.contextmanager
def _quiet_peft():
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every wrap: peft's business, not our users'. Only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


# ------------------------------------------------------------------------------ saving


def manifest(model, training: dict | None = None) -> dict[str, Any]:
    """The ``vlmkit.json`` of ``model``."""
    config = model.settings
    encoder = model.encoder
    return {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "vlmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            **config.model_dump(mode="json"),
            **{k: located(getattr(config, k)) for k in ("encoder_checkpoint", "decoder_checkpoint")},
        },
        "encoder": {
            "plugin": config.encoder,
            "checkpoint": located(config.encoder_checkpoint) or model.encoder_spec.default_checkpoint,
            "revision": config.encoder_revision,
            "fingerprint": encoder.fingerprint(),
            "num_tokens": encoder.num_tokens,
            "feature_dim": encoder.feature_dim,
            "grid": list(encoder.grid) if encoder.grid else None,
        },
        "decoder": {
            "plugin": config.decoder,
            "checkpoint": located(config.decoder_checkpoint) or model.decoder_spec.default_checkpoint,
            "revision": config.decoder_revision,
            "model_type": model.language_model.config.model_type,
        },
        "prefix_tokens": model.num_prefix_tokens,
        "stop_token_ids": model.stop_token_ids,
        # the ids around the image at generation: ``load`` checks that they are still these
        "prompt_ids": prompt_ids(model),
        "files": {
            "projection": "projection.safetensors",
            "adapter": "adapter",
            "encoder": "encoder.safetensors" if model.encoder_weights() else None,
        },
        "training": training or {},
    }


def located(checkpoint: str | None) -> str | None:
    """A local checkpoint as an absolute path (a model folder loads from anywhere), else as given."""
    local = Path(checkpoint).expanduser() if checkpoint else None
    return str(local.resolve()) if local is not None and local.exists() else checkpoint


def prompt_ids(model) -> dict[str, list[int]]:
    context = model.format(None)
    return {"before": list(context.before), "after": list(context.after)}


def state(module) -> dict:
    """``module``'s state dict as contiguous tensors, ready for safetensors."""
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def save(model, path: str | Path, *, training: dict | None = None) -> Path:
    """Write the small artifact: manifest, projection and LoRA adapter (safetensors).

    Other files in the folder (checkpoints, logs) are left alone. The manifest is removed first
    and written last, so a folder whose save was interrupted is never mistaken for a complete model.
    """
    from peft import PeftModel

    if not isinstance(model.lm, PeftModel):
        raise ArtifactError("this model has no LoRA adapter to save (a merged export); export it instead")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a folder; choose a folder to save the model in")
    ours = (path / MANIFEST).exists() or (path / "run.yaml").exists()  # run.yaml: a vlmkit train run
    if path.exists() and not ours and any(path.iterdir()):
        raise ArtifactError(f"{path} exists and is not a vlmkit model; choose another folder")
    with writing(path):
        _save_files(model, path, training)
    return path


def _save_files(model, path: Path, training: dict | None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)
    tmp = path / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state(model.projection), str(tmp / "projection.safetensors"))
    model.lm.save_pretrained(str(tmp / "adapter"))
    files = ["projection.safetensors", "adapter"]
    encoder_weights = model.encoder_weights()
    if encoder_weights:
        save_file(encoder_weights, str(tmp / "encoder.safetensors"))
        files.append("encoder.safetensors")
    else:
        (path / "encoder.safetensors").unlink(missing_ok=True)
    for name in files:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp)
    write_json(path / MANIFEST, manifest(model, training))


# ------------------------------------------------------------------------------ loading


def load(model_class, path: str | Path, *, registry=None, trainable: bool = False, dtype: str | None = None):
    """Rebuild a saved model (``vlmkit.json``) or a merged export (``vlmkit-hf.json``), its base
    weights in ``dtype`` (all of it unless ``trainable``); ``vlmkit.load`` also places it."""
    path = Path(path)
    if (path / MERGED_MANIFEST).is_file() and not (path / MANIFEST).exists():
        return _for_use(_load_merged(model_class, path, registry=registry, dtype=dtype), False, dtype)
    manifest = read_manifest(path)
    config = validate_model_config(manifest.get("config"), source=str(path / MANIFEST))
    encoder_file = (manifest.get("files") or {}).get("encoder")
    _check_files(path, ["projection.safetensors", "adapter/adapter_config.json", encoder_file])
    registry = _registry_with_plugins(registry, config, path)
    model = assemble(
        model_class,
        config,
        registry=registry,
        adapter=path / "adapter",
        projection=path / "projection.safetensors",
        encoder_weights=path / encoder_file if encoder_file else None,
        trainable=trainable,
        seed=None,
        dtype=dtype,
    )
    _warn_if_changed(model, manifest, path)
    return _for_use(model, trainable, dtype)


def _check_files(path: Path, names: list[str | None]) -> None:
    """Each file ``load`` reads is there and intact, checked before minutes of loading base weights."""
    from safetensors import safe_open

    weights = "bin" if (path / "adapter" / "adapter_model.bin").is_file() else "safetensors"  # peft's two
    for name in [*filter(None, names), f"adapter/adapter_model.{weights}"]:
        try:
            if name.endswith(".json"):
                json.loads((path / name).read_bytes())
            elif name.endswith(".safetensors"):
                safe_open(str(path / name), "pt")  # its header gives the file's length: a cut file fails
            elif not (path / name).is_file():
                raise FileNotFoundError(name)
            continue
        except FileNotFoundError:
            problem = "is missing"
        except Exception as exc:  # noqa: BLE001 - json, safetensors and the OS raise their own types
            problem = f"is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        raise ArtifactError(f"model {path}: {name} {problem}; save the model again or train it again")


def _registry_with_plugins(registry, config: ModelConfig, path: Path):
    """The registry, checked to hold the plugins the model at ``path`` needs."""
    from vlmkit.core.registry import get_registry

    registry = registry or get_registry()
    encoder, decoder = config.plugins()
    try:
        registry.encoder(encoder)
        registry.decoder(decoder)
    except PluginError as exc:
        raise PluginError(f"model {path} needs a plugin that is not available: {exc}") from exc
    return registry


def _warn_if_changed(model, manifest: dict[str, Any], path: Path) -> None:
    """Warn when the encoder or the prompt layout is not what the model was trained with."""
    config = model.settings
    # checked after loading trained encoder layers: the saved fingerprint includes them
    saved_fp = (manifest.get("encoder") or {}).get("fingerprint")
    if saved_fp and model.encoder.fingerprint() != saved_fp:
        log.warning(
            "encoder %r differs from the one model %s was trained with (weights or preprocessing "
            "changed); captions may be wrong",
            config.encoder,
            path,
        )
    saved, now = manifest.get("prompt_ids"), prompt_ids(model)
    if saved and saved != now:
        was, new = (f"{len(ids['before'])}+{len(ids['after'])}" for ids in (saved, now))
        log.warning(
            f"decoder {config.decoder!r} lays out the prompt of model {path} differently from when it was "
            f"trained ({was} ids around the image, now {new}: the tokenizer, its chat template or vlmkit "
            "changed); captions may be wrong: load the decoder revision it was trained with"
        )


def _load_merged(model_class, path: Path, *, registry=None, dtype: str | None = None):
    """A captioner from a ``--format hf`` export: the encoder through its plugin, the merged
    decoder from ``decoder/`` (no LoRA, no peft), the saved projection. For inference."""
    manifest = read_merged_manifest(path)
    files = manifest.get("files") or {}
    config = validate_model_config(
        {
            **(manifest.get("config") or {}),
            "decoder_checkpoint": str(path / "decoder"),
            "decoder_revision": None,
        },
        source=str(path / MERGED_MANIFEST),
    )
    model = assemble(
        model_class,
        config,
        registry=_registry_with_plugins(registry, config, path),
        merged=True,
        projection=path / files.get("projection", "projection.safetensors"),
        encoder_weights=path / files["encoder"] if files.get("encoder") else None,
        seed=None,
        dtype=dtype,
    )
    return model


def _for_use(model, trainable: bool, dtype: str | None = None):
    if not trainable:
        model.requires_grad_(False)
        if dtype not in (None, "float32"):
            model.to(torch_dtype(dtype))
    return model.eval()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model folder; ``ArtifactError`` when ``path`` is not a vlmkit model."""
    manifest = paths.read_manifest(path, MANIFEST, format=ARTIFACT_FORMAT, version=ARTIFACT_VERSION,
                                   what="vlmkit model", make="train one with 'vlmkit train'")  # fmt: skip
    if not isinstance(manifest.get("config"), dict):
        raise ArtifactError(
            f"{Path(path) / MANIFEST} has no model config; the folder is damaged: train or save it again"
        )
    return manifest


def read_merged_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a ``--format hf`` export; ``ArtifactError`` when ``path`` is not one."""
    return paths.read_manifest(path, MERGED_MANIFEST, format=MERGED_FORMAT, version=MERGED_VERSION,
                               what="vlmkit merged export", make="make one with 'vlmkit export --format hf'")  # fmt: skip
