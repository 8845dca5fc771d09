"""Trainable tensors in and out of sharded models, and checks that a requested sharding applies.

Checkpoints hold only what training changes (``checkpoint_names``): trainable parameters, plus the
state of the unfrozen encoder blocks (their buffers too), and the optimizer's state. Under FSDP2
(``fully_shard``) those parameters are ``DTensor`` shards; under FSDP1
(``FullyShardedDataParallel(use_orig_params=True)``) they are flat-parameter views, empty on the
ranks that do not own them. ``trainable_state_dict`` gathers full tensors (a collective: every rank
calls it) and ``load_trainable`` puts full tensors back into the shards; pass them the model as
wrapped under FSDP1 (the root, not its ``.module``), and the module (not the engine) under DeepSpeed
ZeRO-3, whose partitioned parameters are gathered with ``deepspeed.zero.GatheredParameters``. Under ``Trainer`` with FSDP or DeepSpeed, ``Trainer``
gathers the state dict itself and hands it to ``_save``.

Only what a checkpoint holds is gathered, never the whole model: a model that needed sharding does
not fit unsharded on one GPU. Under FSDP2 each trainable ``DTensor`` is gathered alone; under
FSDP1 one unit at a time (``summon_full_params(unit, recurse=False)``: a flat parameter is
gathered whole, so a unit holding a LoRA adapter brings its block's frozen weights with it, as
its forward does); under ZeRO-3 only the partitions of those tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vlmkit.core import ranks
from vlmkit.core.errors import ConfigError

#: the trainable tensors of a checkpoint (``VLMTrainer`` writes the same file)
TRAINABLE_FILE = "trainable.safetensors"
#: the device class and precision a run resolved, in the run folder and in each checkpoint: a
#: resumed run continues in them (``auto`` on another machine could pick another precision)
PLACEMENT_FILE = "placement.json"


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


#: what wrappers put into parameter names (FSDP1 units, activation checkpointing); state dicts omit it
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """``name`` as a state dict has it: without the wrappers' ``_fsdp_wrapped_module.`` parts."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp1_root(model):
    """The outermost FSDP1 ``FullyShardedDataParallel`` in ``model`` (``model`` itself when it is
    one), or ``None`` when there is none."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)


def vlm_of(model):
    """The ``PrefixConditioningVLM`` inside a wrapped ``model`` (an FSDP1 root keeps it as ``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "encoder_weights"):
        model = model.module
    return model


def zero3_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters DeepSpeed ZeRO-3 partitions (empty on every rank outside a gather)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_sharded(model) -> bool:
    """True when some parameter is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallelism), a
    DeepSpeed ZeRO-3 partition, or the model holds FSDP1 units."""
    dtensor = _dtensor_type()
    return (
        (bool(dtensor) and any(isinstance(p, dtensor) for p in model.parameters()))
        or fsdp1_root(model) is not None
        or bool(zero3_parameters(model))
    )


def _own_tensors(model) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by state-dict name, without calling ``state_dict()``
    (under FSDP1 that is a collective, and ``_save`` runs on the saving rank alone)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {clean_name(n): t for n, t in named}


def checkpoint_names(model) -> list[str]:
    """State-dict names of what a checkpoint holds: trainable parameters and the unfrozen encoder
    blocks' parameters and buffers (``model.encoder_weights()``)."""
    names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
    seen = set(names)
    names += [n for k in vlm_of(model).encoder_weights() if (n := f"encoder.{clean_name(k)}") not in seen]
    return names


def trainable_state_dict(model, state_dict: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU tensors for ``checkpoint_names(model)``.

    From ``state_dict`` when given (the gathered one ``Trainer`` passes under FSDP and DeepSpeed);
    otherwise from the model itself, gathering FSDP2 ``DTensor`` shards or FSDP1 flat parameters:
    then every rank must call it.
    """
    names = checkpoint_names(model)
    if state_dict is None and (root := fsdp1_root(model)) is not None:
        return _fsdp1_take(root, names)
    if state_dict is None and (gather := gathered(model, modifier_rank=None, names=names)) is not None:
        with gather:
            # copies: the gathered parameters are views of storage freed when the context ends
            return {k: v.clone() for k, v in _take(model, names, None).items()}
    return _take(model, names, state_dict)


def gathered(model, modifier_rank: int | None = None, names: list[str] | None = None):
    """A context holding full parameters on every rank, under FSDP1 (the root unit's
    ``summon_full_params``, all units) or ZeRO-3 (``GatheredParameters``; changes made on
    ``modifier_rank`` are partitioned again on exit); ``None`` for other models. A collective.
    ``names`` (state-dict names): under ZeRO-3, gather only those parameters."""
    root = fsdp1_root(model)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(root, writeback=modifier_rank is not None)
    if names is None:
        partitioned = zero3_parameters(model)
    else:
        wanted = set(names)
        partitioned = [
            p
            for n, p in model.named_parameters(remove_duplicate=False)
            if hasattr(p, "ds_id") and clean_name(n) in wanted
        ]
    if partitioned:
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
    return None


def _fsdp1_units(root) -> list[tuple[Any, list[str]]]:
    """Every FSDP1 unit under ``root`` (``root`` first) with the state-dict names of the parameters
    it manages itself (those of its modules outside nested units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units: list[tuple[Any, list[str]]] = []

    def visit(unit, prefix: str) -> None:
        owned: list[str] = []
        units.append((unit, owned))

        def walk(module, path: str) -> None:
            owned.extend(clean_name(path + n) for n, _ in module.named_parameters(recurse=False))
            for name, child in module.named_children():
                (visit if isinstance(child, FullyShardedDataParallel) else walk)(child, f"{path}{name}.")

        walk(unit, prefix)

    visit(root, "")
    return units


def _fsdp1_each_unit(root, names, *, writeback: bool):
    """``(unit, its names among names)`` for the units holding one of ``names``, each yielded while
    that unit alone holds full parameters; the root unit always comes first (it sets the inner
    units up on first use). Every rank must run it through."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wanted = set(names)
    for index, (unit, owned) in enumerate(_fsdp1_units(root)):
        mine = [n for n in owned if n in wanted]
        if mine or index == 0:
            with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=writeback):
                yield unit, mine


def _fsdp1_take(root, names: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for _, mine in _fsdp1_each_unit(root, names, writeback=False):
        own = _own_tensors(root)
        # copies: the full parameters are views of storage freed when the unit reshards
        out.update({n: own[n].detach().contiguous().cpu().clone() for n in mine})
    rest = [n for n in names if n not in out]  # buffers (the unfrozen encoder's): never sharded
    out.update(_take(root, rest, None))
    return {n: out[n] for n in names}


def _take(model, names: list[str], state_dict: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    own = _own_tensors(model)
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
    FSDP2 ``DTensor`` shards or, under FSDP1 and ZeRO-3, into full parameters gathered for it and
    sharded again (every rank calls it, with the same tensors)."""
    own = _own_tensors(model)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ConfigError(f"{source} does not fit this model (e.g. {unknown[0]})")
    root = fsdp1_root(model)
    if root is not None:
        done: set[str] = set()
        for _, mine in _fsdp1_each_unit(root, list(tensors), writeback=True):
            _copy_into(_own_tensors(root), {n: tensors[n] for n in mine})
            done.update(mine)
        _copy_into(own, {n: t for n, t in tensors.items() if n not in done})
        return
    gather = gathered(model, modifier_rank=0, names=list(tensors))
    if gather is not None:
        with gather:
            _copy_into(_own_tensors(model), tensors)
        return
    _copy_into(own, tensors)


def _copy_into(own: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    dtensor = _dtensor_type()
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            if dtensor and isinstance(target, dtensor):
                from torch.distributed.tensor import distribute_tensor

                value = value.to(device=target.device, dtype=target.dtype)
                value = distribute_tensor(value, target.device_mesh, target.placements)
            target.copy_(value)


OPTIMIZER_FILE = "optimizer.pt"


def save_checkpoint(model, optimizer, folder) -> None:
    """A resumable checkpoint of a sharded (or plain) model outside ``Trainer``: the gathered
    trainable tensors and the optimizer's full state, written by rank 0, each file atomically and
    the tensors last (a folder holding them is complete). Every rank calls it (gathering)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from vlmkit.core.paths import atomic_write

    tensors = trainable_state_dict(model)
    state = optimizer_state(model, optimizer)
    if ranks.rank() == 0:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / OPTIMIZER_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write(folder / TRAINABLE_FILE, lambda tmp: save_file(tensors, str(tmp)))
    ranks.barrier()


def load_checkpoint(model, optimizer, folder) -> None:
    """Resume ``model`` (sharded or not, freshly built) and ``optimizer`` from ``save_checkpoint``'s
    ``folder``. Every rank calls it; every rank must see the folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TRAINABLE_FILE).is_file() or not (folder / OPTIMIZER_FILE).is_file():
        raise ConfigError(f"{folder} is not a complete checkpoint ({TRAINABLE_FILE} and {OPTIMIZER_FILE})")
    load_trainable(model, load_file(str(folder / TRAINABLE_FILE)), source=f"checkpoint {folder}")
    load_optimizer_state(model, optimizer, folder / OPTIMIZER_FILE)


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by parameter name, full tensors on the CPU (a collective when
    sharded; under FSDP complete on rank 0 only). Compact copies: FSDP1 hands out views into one
    buffer as large as a unit's flat parameter, frozen weights included, which ``torch.save``
    would write whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    state = get_optimizer_state_dict(model, optimizer, options=options)
    for per_param in state.get("state", {}).values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                per_param[key] = value.detach().cpu().clone()
    return state


def load_optimizer_state(model, optimizer, file) -> None:
    """``optimizer_state``'s file into ``optimizer`` (sharded like ``model``); every rank reads it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(file, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shard_model(model, **fully_shard_kwargs: Any):
    """FSDP2: ``fully_shard`` every decoder block (the decoder plugin's layer class, as
    ``model._no_split_modules`` says) and then the root (encoder, projection, embeddings, head).

    Generation under sharding: wrap it in ``unsharded_root(model)`` and pass
    ``generate_in_step(model)`` (``synced_gpus``): the sharded blocks need every rank in each
    forward, so every rank steps until all are done.
    """
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(model._no_split_modules)
    if not layer_classes:
        raise ConfigError(f"decoder plugin {model.decoder_spec.name!r} declares no layer_class to shard by")
    blocks = [m for m in model.language_model.modules() if type(m).__name__ in layer_classes]
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def generate_in_step(model) -> dict[str, bool]:
    """``generate`` options for ``model`` under ``torch.distributed``: ``synced_gpus`` when it is
    sharded (FSDP, ZeRO-3), so that every rank steps until all are done: a sharded block gathers its
    weights from every rank in each forward, and a rank done early would leave the others waiting
    for ever. Said explicitly, not left to transformers' reading of the markers torch sets for
    Dynamo on the modules FSDP manages."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"synced_gpus": True} if world > 1 and is_sharded(model) else {}


@contextlib.contextmanager
def unsharded_root(model) -> Iterator[None]:
    """Full parameters of the root unit for calls other than ``forward`` (``generate``: the
    encoder, the projection and the embeddings live in the root unit), FSDP2 or FSDP1; a no-op
    otherwise. The decoder blocks still gather their own parameters in each forward, so every rank
    must generate as many steps (pass ``generate_in_step(model)``)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    elif isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield


def save_model(model, path, *, training: dict | None = None, registry=None) -> None:
    """``model.save(path)`` from every rank: rank 0 writes. Under FSDP the trainable tensors are
    gathered first (a collective) and rank 0 writes them from an unsharded copy of the model, built
    from the same config: a sharded module's ``state_dict`` holds shards, never full tensors."""
    if not is_sharded(model):
        if ranks.rank() == 0:
            vlm_of(model).save(path, training=training)
        return
    tensors = trainable_state_dict(model)
    if ranks.rank() == 0:
        from vlmkit.core.model import PrefixConditioningVLM

        with _without_zero3_init():  # (an FSDP1 root is not the model's class: it forwards to it)
            plain = PrefixConditioningVLM.build(vlm_of(model).settings, registry=registry, seed=None)
        load_trainable(plain, tensors, source="the gathered trainable tensors")
        plain.save(path, training=training)


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """While a DeepSpeed ZeRO-3 config is registered (``Trainer`` under DeepSpeed), transformers
    builds every model partitioned (``deepspeed.zero.Init``, a collective): rank 0 alone building
    the plain copy would wait for ever. Unregistered for that build."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def checkpoints_without_frozen_weights(engine) -> None:
    """DeepSpeed ``engine``'s checkpoints without the frozen weights, and loaded back without them.

    ``Trainer`` leaves them out only for a ``PeftModel``; here they are the referenced base (never
    trained: gigabytes per checkpoint), and resuming rebuilds them from it, so the module state is
    loaded non-strictly. The trainable tensors are in ``trainable.safetensors`` and the optimizer's
    partitions.
    """
    if getattr(engine, "_vlmkit_without_frozen", False):
        return
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_trained(*args, **kwargs):
        return save(*args, **{**kwargs, "exclude_frozen_parameters": True})

    def load_trained(*args, **kwargs):
        return load(*args, **{**kwargs, "load_module_strict": False})

    engine.save_checkpoint, engine.load_checkpoint = save_trained, load_trained
    engine._vlmkit_without_frozen = True


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Refuse a DeepSpeed config that would drop what vlmkit trains with.

    An ``optimizer`` section makes ``Trainer`` hand DeepSpeed a placeholder and DeepSpeed build its
    own optimizer with one learning rate for every parameter: vlmkit's per-part rates (projection,
    LoRA, encoder) would be silently replaced. Without it, vlmkit's optimizer is used (under
    ZeRO-Offload, DeepSpeed's CPU Adam with the same parameter groups: ``offloads_optimizer``)."""
    if "optimizer" in config:
        raise ConfigError(
            "the DeepSpeed config has an optimizer section, which would replace vlmkit's per-part learning "
            "rates (lr_projection, lr_lora, lr_encoder) with one: remove the optimizer section (vlmkit builds "
            "AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload)"
        )


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    """True when a DeepSpeed config offloads the optimizer (ZeRO-Offload, to CPU or NVMe), where
    DeepSpeed accepts only its own CPU Adam (or refuses to start)."""
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def check_fsdp_applies(trainer) -> None:
    """Refuse an FSDP request that ``Trainer`` would silently ignore.

    With ``use_cpu=True`` (every CPU run) transformers sets up plain multi-process CPU training
    (``MULTI_CPU``) and never enables FSDP: the user asked for sharding and would get replicas.
    FSDP1 without ``use_orig_params`` is refused too (LoRA units mix frozen and trainable
    parameters; torch would stop at wrapping): accelerate's own default
    (``fsdp_use_orig_params`` unset in ``accelerate config``) is False. FSDP1 with parameters of
    more than one dtype is refused too (``base_dtype`` keeps vlmkit's own models to one).
    """
    wants = bool(trainer.args.fsdp) or fsdp_version_requested() is not None
    if wants and not trainer.is_fsdp_enabled:
        raise ConfigError(
            f"FSDP was requested but this run is {trainer.accelerator.distributed_type.value}, where "
            "transformers' Trainer does not shard (it never does on CPU): drop the FSDP option, or train "
            "on GPUs"
        )
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
        raise ConfigError(
            "FSDP1 is configured with use_orig_params=False, but LoRA mixes frozen and trainable "
            "parameters in one unit: set fsdp_use_orig_params: true in the accelerate config (or "
            "fsdp_config use_orig_params), or use FSDP2 (fsdp_version: 2)"
        )
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()})
        if len(dtypes) > 1:
            raise ConfigError(
                f"FSDP1 flattens each unit into one tensor of one dtype, but the model holds {' and '.join(dtypes)} "
                "parameters: load the frozen base in float32 (FSDP's mixed precision computes in bf16/fp16), "
                "or use FSDP2 (fsdp_version: 2)"
            )


def fsdp_version_requested() -> int | None:
    """The FSDP version ``accelerate launch`` asks for (``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION``,
    which defaults to 1 there as in accelerate's plugin), or ``None`` when it asks for no FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1") or 1)


def base_dtype(dtype: str | None) -> str | None:
    """The dtype to load the frozen base in for a run whose precision gives ``dtype``.

    Under FSDP1, float32 whatever the precision: FSDP1 flattens each unit's parameters into one
    tensor, which must have one dtype ("Must flatten tensors with uniform dtype"), and a unit
    holds frozen base weights beside fp32 LoRA or projection weights. ``use_orig_params`` does not
    lift that. FSDP's mixed-precision policy (accelerate sets it from bf16/fp16) still computes in
    the run's precision, and accelerate upcasts 16-bit flat parameters to float32 anyway, so the
    memory is what FSDP1 would use. FSDP2 shards each parameter alone: any mix of dtypes."""
    if dtype not in (None, "float32") and fsdp_version_requested() == 1:
        return "float32"
    return dtype
