"""Trainable tensors in and out of sharded models, and checks that a requested sharding applies.

Checkpoints hold only what training changes (``checkpoint_names``): trainable parameters, plus the
state of the unfrozen encoder blocks (their buffers too). Under FSDP2 (``fully_shard``) those
parameters are ``DTensor`` shards: ``trainable_state_dict`` gathers full tensors (a collective:
every rank calls it) and ``load_trainable`` scatters full tensors back into the shards. Under
FSDP1 and DeepSpeed, ``Trainer`` gathers the state dict itself and hands it to ``_save``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vlmkit.core.errors import ConfigError


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


def is_sharded(model) -> bool:
    """True when some parameter is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallelism)."""
    dtensor = _dtensor_type()
    return bool(dtensor) and any(isinstance(p, dtensor) for p in model.parameters())


def checkpoint_names(model) -> list[str]:
    """State-dict names of what a checkpoint holds: trainable parameters and the unfrozen encoder
    blocks' parameters and buffers (``model.encoder_weights()``)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    seen = set(names)
    names += [n for k in model.encoder_weights() if (n := f"encoder.{k}") not in seen]
    return names


def trainable_state_dict(model, state_dict: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU tensors for ``checkpoint_names(model)``.

    From ``state_dict`` when given (the gathered one ``Trainer`` passes under FSDP and DeepSpeed);
    otherwise from the model itself, gathering ``DTensor`` shards: then every rank must call it.
    """
    names = checkpoint_names(model)
    own = model.state_dict(keep_vars=True)
    dtensor = _dtensor_type()
    out = {}
    for name in names:
        if state_dict is not None and name in state_dict:
            tensor = state_dict[name]
        elif state_dict is not None and isinstance(own[name], torch.nn.Parameter):
            raise ConfigError(
                f"the gathered state dict lacks the trainable tensor {name}; under DeepSpeed ZeRO-3 set "
                "stage3_gather_16bit_weights_on_model_save"
            )
        else:  # not passed (or a buffer, which no sharding splits): the model's own
            tensor = own[name]
        tensor = tensor.detach()
        if dtensor and isinstance(tensor, dtensor):
            tensor = tensor.full_tensor()
        out[name] = tensor.contiguous().cpu()
    return out


def load_trainable(model, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Copy full ``tensors`` (from ``trainable_state_dict``) into ``model``, distributing them into
    ``DTensor`` shards under FSDP2 (every rank calls it, with the same tensors)."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ConfigError(f"{source} does not fit this model (e.g. {unknown[0]})")
    dtensor = _dtensor_type()
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            if dtensor and isinstance(target, dtensor):
                from torch.distributed.tensor import distribute_tensor

                value = value.to(device=target.device, dtype=target.dtype)
                value = distribute_tensor(value, target.device_mesh, target.placements)
            target.copy_(value)


def shard_model(model, **fully_shard_kwargs: Any):
    """FSDP2: ``fully_shard`` every decoder block (the decoder plugin's layer class, as
    ``model._no_split_modules`` says) and then the root (encoder, projection, embeddings, head).

    Generation under sharding: wrap it in ``unsharded_root(model)``; the decoder is marked as
    FSDP-managed so that transformers' ``generate`` keeps every rank stepping until all are done
    (``synced_gpus``), as the sharded blocks need every rank in each forward.
    """
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(model._no_split_modules)
    if not layer_classes:
        raise ConfigError(f"decoder plugin {model.decoder_spec.name!r} declares no layer_class to shard by")
    blocks = [m for m in model.language_model.modules() if type(m).__name__ in layer_classes]
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    model.language_model._is_fsdp_managed_module = True  # transformers' own FSDP2 marker
    return model


@contextlib.contextmanager
def unsharded_root(model) -> Iterator[None]:
    """Full parameters of an FSDP2 root for calls other than ``forward`` (``generate``: the
    encoder, the projection and the embeddings live in the root unit); a no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def save_model(model, path, *, training: dict | None = None, registry=None) -> None:
    """``model.save(path)`` from every rank: rank 0 writes. Under FSDP2 the trainable tensors are
    gathered first (a collective) and rank 0 writes them from an unsharded copy of the model, built
    from the same config: a sharded module's ``state_dict`` holds shards, never full tensors."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if not is_sharded(model):
        if rank == 0:
            model.save(path, training=training)
        return
    tensors = trainable_state_dict(model)
    if rank == 0:
        from vlmkit.core.artifact import assemble

        plain = assemble(model.settings, registry=registry, seed=None)
        load_trainable(plain, tensors, source="the gathered trainable tensors")
        plain.save(path, training=training)


def check_fsdp_applies(trainer) -> None:
    """Refuse an FSDP request that ``Trainer`` would silently ignore.

    With ``use_cpu=True`` (every CPU run) transformers sets up plain multi-process CPU training
    (``MULTI_CPU``) and never enables FSDP: the user asked for sharding and would get replicas.
    """
    import os

    wants = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if wants and not trainer.is_fsdp_enabled:
        raise ConfigError(
            f"FSDP was requested but this run is {trainer.accelerator.distributed_type.value}, where "
            "transformers' Trainer does not shard (it never does on CPU): drop the FSDP option, or train "
            "on GPUs"
        )
