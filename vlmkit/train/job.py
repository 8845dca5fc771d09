"""The ``vlmkit train`` job: fit the projection and the LoRA adapter with Hugging Face ``Trainer``.

``Trainer`` gives us gradient accumulation, schedules, checkpoints and resume, evaluation,
logging, and distributed training (``torchrun``/``accelerate launch``: DDP, FSDP, DeepSpeed)
with no code of ours. What is ours:

- Features from a frozen encoder come from the on-disk cache (``vlmkit.train.features``), computed once
  on the training device (rows split across ranks under torchrun), after the projection's
  parameter-free token reduction, and read every epoch: the encoder never runs in the training loop,
  and it waits on the CPU, outside the trained model (``set_encoder_aside``).
- Checkpoints hold only the trainable tensors (projection, LoRA, unfrozen encoder layers), not
  the frozen base weights, so they are megabytes, not gigabytes.
- The output folder is a model artifact (``vlmkit.json`` ...), with ``checkpoints/``,
  ``logs.jsonl``, ``tensorboard/`` and ``run.yaml`` beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import EarlyStoppingCallback, Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from vlmkit.core import ranks
from vlmkit.core.config import validate_model_config
from vlmkit.core.errors import ConfigError, DataError, TrainingDiverged, VlmkitWarning, WriteError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.core.paths import FileLock, atomic_write, check_writable_folder, make_dirs, write_json, writing
from vlmkit.core.placement import Placement, resolve, resolve_device
from vlmkit.core.registry import get_registry
from vlmkit.sdk.datasets import BadImagesError, data_sources, dataset_cache_root, load_split, tsv_field
from vlmkit.train.config import TrainConfig
from vlmkit.train.data import CaptionTrainingSet, Collator
from vlmkit.train.distributed import (
    PLACEMENT_FILE,
    base_dtype,
    fsdp1_root,
    gathered,
    save_model,
    zero3_parameters,
)
from vlmkit.train.features import FeatureCache
from vlmkit.train.trainer import JsonlLogger, VLMTrainer, prepare_model_for_precision

log = logging.getLogger(__name__)

RUN_FILE = "run.yaml"
#: held (flock) by the run training into the folder: see ``RunLock``
LOCK_FILE = ".vlmkit-train.lock"
#: every image a dataset refused or skipped, with what is wrong with it (tab-separated)
BAD_IMAGES_FILE = "bad_images.tsv"
#: settings that define *what* is trained; a folder holding a run that differs in these is a
#: different run and is never silently continued or overwritten
IDENTITY_FIELDS = ("model", "datasets", "seed")
#: settings that decide which examples each step sees: changing them on --resume is allowed (to fit
#: memory, say) but the interrupted epoch is then skipped by another order, so it is warned about
DATA_ORDER_FIELDS = ("batch_size", "grad_accum", "group_by_length")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    samples_per_second: float | None
    seconds: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    used_feature_cache: bool = False


def prepare_output_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding another run is never silently reused or deleted."""
    out = config.output
    run_file = out / RUN_FILE
    refuse_foreign_folder(config)
    if config.cache_dir is not None and config.feature_cache:
        check_writable_folder(config.cache_dir, "--cache-dir")
    if _empty(out):
        if resume:
            raise ConfigError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return
    if overwrite:  # all but the lock this run holds
        for child in out.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return
    previous = yaml.safe_load(run_file.read_text()) or {}
    if isinstance(previous.get("model"), dict):  # a run of an earlier vlmkit: its keys as named now
        previous["model"] = validate_model_config(previous["model"], str(run_file)).model_dump(mode="json")
    current = json.loads(config.model_dump_json())
    differs = [d for k in IDENTITY_FIELDS for d in _differences(previous.get(k), current.get(k), k)]
    # skipping bad images instead of refusing them changes which examples train, not what is trained
    order = [d for d in differs if d.split(":")[0].endswith(".options.on_bad_image")]
    differs = [d for d in differs if d not in order]
    if not resume:
        raise ConfigError(
            f"output folder {out} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or choose another --output"
        )
    if differs:
        raise ConfigError(
            f"--resume: {out} holds a different run ({', '.join(differs)} differ); use the same settings, "
            "or --overwrite to replace it"
        )
    defaults = TrainConfig.model_fields
    order += [
        d
        for k in DATA_ORDER_FIELDS
        for d in _differences(previous.get(k, defaults[k].default), current.get(k), k)
    ]
    if order:
        warnings.warn(
            f"--resume with {', '.join(order)}: the interrupted epoch continues in another order, so some "
            "of its examples may be seen twice and others not at all; resume with the run's settings to avoid it",
            VlmkitWarning,
            stacklevel=2,
        )


def refuse_foreign_folder(config: TrainConfig) -> None:
    """``--output`` must be writable, and empty or a vlmkit run: checked before anything loads
    (and before the run's lock file is made in it)."""
    out = config.output
    check_writable_folder(out, "--output")
    if not _empty(out) and not (out / RUN_FILE).is_file():
        raise ConfigError(
            f"output folder {out} is not empty and holds no vlmkit run; choose another --output"
        )


def _empty(out: Path) -> bool:
    """No folder, or one with nothing but a list of bad images (a start refused for them: the
    corrected command may use the folder) and the lock file."""
    return not out.exists() or not any(p.name not in (BAD_IMAGES_FILE, LOCK_FILE) for p in out.iterdir())


def _differences(before: Any, now: Any, key: str) -> list[str]:
    """``key.sub: before -> now`` for every leaf setting that changed."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in {**before, **now} for d in _differences(before.get(k), now.get(k), f"{key}.{k}")]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [
            d
            for i, (b, n) in enumerate(zip(before, now, strict=True))
            for d in _differences(b, n, f"{key}.{i}")
        ]
    return [] if before == now else [f"{key}: {json.dumps(before)} -> {json.dumps(now)}"]


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete ``checkpoints/checkpoint-N``. One that lacks a file (a run killed while
    writing it) is passed over with a warning: resuming from it would fail or lose the optimizer."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from vlmkit.train.trainer import TRAINABLE_FILE

    folder = output_dir / "checkpoints"
    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        if path.is_dir() and path.name.rpartition("-")[2].isdigit():
            steps[int(path.name.rpartition("-")[2])] = path
    for step in sorted(steps, reverse=True):
        missing = [f for f in ("trainer_state.json", TRAINABLE_FILE) if not (steps[step] / f).is_file()]
        if not missing and _start_step(steps[step]) is not None:
            return str(steps[step])
        warnings.warn(
            f"--resume: {steps[step]} is incomplete ({', '.join(missing) or 'trainer_state.json'} missing or "
            "cut short: the run stopped while writing it); looking for an earlier checkpoint",
            VlmkitWarning,
            stacklevel=2,
        )
    return None


def _start_step(checkpoint: str | Path) -> int | None:
    """The step ``checkpoint`` was saved at; ``None`` when its trainer_state.json is unreadable."""
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished(trainer: VLMTrainer, checkpoint: str) -> TrainOutput:
    """A run whose last checkpoint is at ``max_steps`` (killed during the final save): its weights
    and state, without ``Trainer.train``, which would step once more when that checkpoint is not
    at an epoch's end (its loop looks for the end only after a step)."""
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    trainer._load_trainable(checkpoint)
    if trainer.args.load_best_model_at_end:
        trainer._load_best_model()
    return TrainOutput(trainer.state.global_step, 0.0, {})


def _train_loss(trainer: Trainer, training_loss: float, start_step: int) -> float | None:
    """Transformers averages the loss over the steps of this call alone: after a resume from the
    final checkpoint (nothing left to train) that is 0.0. Then the mean of the logged losses."""
    if trainer.state.global_step > start_step:
        return training_loss
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return sum(losses) / len(losses) if losses else None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    registry=None,
    callbacks: list | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model as ``config`` says and write the artifact to ``config.output``, which
    this run holds locked (``RunLock``) until it ends."""
    with RunLock(config.output) as lock, _terminate_as_interrupt():
        return _train(config, lock, resume, overwrite, registry, callbacks, progress)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a scheduler ending the job, torchrun stopping the other ranks) ends a run
    as Ctrl-C does: ``KeyboardInterrupt``, which the CLI reports with how to resume, instead of the
    silent default death. Only the main thread may set a handler; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunLock:
    """An exclusive ``flock`` on ``<output>/LOCK_FILE`` for the life of a run (taken by rank 0 of
    a distributed one): a second ``vlmkit train`` into the same folder, started or resumed while
    the first runs, is refused in one line instead of interleaving its logs and replacing the
    model. ``flock`` is released by the system when the process dies, so a killed run leaves no
    stale lock. (It is local to a machine and missing on some network file systems, and on
    Windows, where this does nothing.)"""

    def __init__(self, output_dir: Path) -> None:
        self.folder = output_dir
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        file = make_dirs(self.folder) / LOCK_FILE
        lock = FileLock(file, blocking=False)
        with writing(file):
            held = lock.acquire()
        if not held:
            try:
                holder = file.read_bytes()[:64].decode(errors="replace").strip()
            except OSError:
                holder = ""
            raise ConfigError(
                f"output folder {self.folder} is in use by another vlmkit train"
                + (f" (process {holder})" if holder.isdigit() else "")
                + "; wait for it to finish, or choose another --output"
            )
        self._lock = lock

    def sign(self) -> None:
        """Write this process's id into the held lock file, for the refusal of another run: only
        once this run is sure to go ahead (a refused start leaves the folder as it was)."""
        if self._lock is not None and self._lock.fd is not None:
            os.ftruncate(self._lock.fd, 0)
            os.pwrite(self._lock.fd, str(os.getpid()).encode(), 0)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _train(
    config: TrainConfig, lock: RunLock, resume, overwrite, registry, callbacks, progress
) -> TrainResult:
    from transformers import set_seed

    started = time.perf_counter()
    out = config.output
    placement = training_placement(config, recorded_placement(out) if resume else None, registry=registry)
    args = _training_arguments(config, progress, placement)  # sets up torch.distributed under torchrun
    refusal = None
    if args.process_index == 0:
        try:
            refuse_foreign_folder(config)  # before the lock file is made in it
            lock.acquire()
            prepare_output_dir(config, resume=resume, overwrite=overwrite)
            lock.sign()
        except (ConfigError, WriteError) as exc:
            refusal = str(exc)
    # every rank raises the refusal: one that waited at a barrier instead would hang until timeout
    if (refusal := ranks.broadcast(refusal)) is not None:
        raise ConfigError(refusal)
    if args.process_index == 0:
        log.info("training on %s", placement.describe())

    # the data first: a bad file fails the run in seconds, not after minutes of loading weights
    with dataset_cache_root(config.cache_dir):  # remembered image checks beside the features
        train_data, eval_data = _load_data(config, registry, write_list=args.process_index == 0)
    set_seed(config.seed)  # after the data: a loader drawing random numbers does not change the model
    # the frozen encoder stays fp32 when it fills the feature cache: the cached features are then
    # the same whatever precision a run trains in, and every run of the data reuses them
    dtype = base_dtype(placement.dtype)  # float32 under FSDP1, which needs one dtype per unit
    if dtype != placement.dtype and args.process_index == 0:
        log.info("FSDP1: the frozen base loads in float32; FSDP computes in %s", placement.precision)
    model = PrefixConditioningVLM.build(
        config.model,
        registry=registry,
        seed=config.seed,
        dtype=dtype,
        encoder_dtype="float32" if config.feature_cache else None,
    )
    if args.process_index == 0:  # resolved against the loaded model: what LoRA really adapts
        lora = model.lm.peft_config["default"]
        log.info(
            "LoRA r=%d on %s of the %s model",
            lora.r,
            ", ".join(sorted(lora.target_modules)),
            config.model.decoder,
        )
    prepare_model_for_precision(model, placement.precision, placement.device_type, config.attn_implementation)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    use_cache = config.feature_cache and model.encoder_frozen
    train_features = eval_features = None
    if use_cache:
        # on the training device (each rank its share of the rows), reduced as the projection reduces
        cache = FeatureCache(config.cache_dir)
        options = dict(projection=config.model.projection, device=args.device, progress=progress)
        # DeepSpeed ZeRO-3: transformers loaded the encoder partitioned (zero.Init); it runs here,
        # outside the engine, so its full weights are gathered first
        with gathered(model.encoder) or contextlib.nullcontext():
            train_features = cache.features_for(model.encoder, train_data, **options)
            eval_features = cache.features_for(model.encoder, eval_data, **options)
        set_encoder_aside(model)  # training and its evaluation read the features: not the encoder
    preprocess = None if use_cache else model.preprocess
    train_set = CaptionTrainingSet(train_data, train_features, preprocess, config.max_train_samples)
    eval_set = CaptionTrainingSet(eval_data, eval_features, preprocess, config.max_eval_samples)
    if args.process_index == 0:
        # written once the model and the data have loaded: a run that fails to start (a bad image,
        # a wrong checkpoint) leaves no run.yaml, so the corrected command needs no --overwrite
        make_dirs(out)
        run_yaml = yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
        atomic_write(out / RUN_FILE, lambda tmp: tmp.write_text(run_yaml))
        write_json(out / PLACEMENT_FILE, placement_record(placement))

    cbs = [JsonlLogger(out / "logs.jsonl"), *(callbacks or [])]
    if args.process_index == 0 and (tensorboard := _tensorboard_callback(out / "tensorboard")):
        cbs.append(tensorboard)
    if config.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = VLMTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        # tensor cores work on multiples of 8: padded rows cost a few masked positions
        data_collator=Collator(model, pad_to_multiple_of=8 if placement.device_type == "cuda" else None),
        callbacks=cbs,
        vlm_config=config,
        eval_captions=(eval_data, eval_features) if config.eval_metrics else None,
        placement=placement_record(placement),
    )
    checkpoint, start_step = None, 0
    if resume:
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(
                f"--resume: {out / 'checkpoints'} holds no complete checkpoint; use --overwrite to start over"
            )
        log.info("resuming from %s", checkpoint)
        start_step = _start_step(checkpoint) or 0
        if args.process_index == 0:
            _forget_logs_after(out / "logs.jsonl", start_step)
    try:
        if checkpoint is not None and 0 < args.max_steps <= start_step:
            result = _finished(trainer, checkpoint)
        else:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.check_weights_finite()  # the last step's update, after the last check of its loss
    except TrainingDiverged as exc:
        raise TrainingDiverged(exc.step, _diverged(config, exc)) from None
    train_loss = _train_loss(trainer, result.training_loss, start_step)
    eval_metrics = {}
    if config.eval_metrics or config.early_stopping_patience:
        eval_metrics = _final_evaluation(trainer) or trainer.evaluate()

    put_encoder_back(model)
    # FSDP1: through the root unit Trainer wrapped (the raw model's own units are only its blocks)
    root = fsdp1_root(trainer.model_wrapped)
    save_model(  # rank 0 writes; under FSDP and ZeRO-3 every rank first takes part in gathering
        root if root is not None else model,
        out,
        training={
            "config": json.loads(config.model_dump_json()),
            "global_step": trainer.state.global_step,
            "train_loss": train_loss,
            "eval": eval_metrics,
            "used_feature_cache": use_cache,
            "placement": placement_record(placement),  # how it ran, not what it is
            "data": data_sources(train_data),  # hub ids and the revisions read
        },
        registry=registry,
    )
    ranks.barrier()
    return TrainResult(
        output_dir=out,
        global_step=trainer.state.global_step,
        train_loss=train_loss,
        samples_per_second=result.metrics.get("train_samples_per_second"),
        seconds=time.perf_counter() - started,
        eval_metrics=eval_metrics,
        used_feature_cache=use_cache,
    )


def run(
    config: TrainConfig, *, registry=None, callbacks: list | None = None, progress: bool = True
) -> TrainResult:
    """``vlmkit train``: ``train`` with the run actions ``config`` holds (``resume``, ``overwrite``)."""
    return train(
        config,
        resume=config.resume,
        overwrite=config.overwrite,
        registry=registry,
        callbacks=callbacks,
        progress=progress,
    )


def set_encoder_aside(model: PrefixConditioningVLM) -> None:
    """Take the frozen encoder out of ``model``'s modules, onto the CPU, while training reads cached
    features (it never runs then): ``Trainer`` would move it to every GPU, DDP replicate it, FSDP
    shard it and gather it in each step of the root unit. ``model.encoder`` still answers, as a
    plain attribute; ``put_encoder_back`` makes it a submodule again (for saving). Not under
    DeepSpeed ZeRO-3, whose partitioned encoder is its engine's to gather."""
    if zero3_parameters(model.encoder):
        return
    encoder = model._modules.pop("encoder")
    object.__setattr__(model, "encoder", encoder.to("cpu"))  # not nn.Module's: no registration


def put_encoder_back(model: PrefixConditioningVLM) -> None:
    encoder = model.__dict__.pop("encoder", None)
    if encoder is not None:
        model.encoder = encoder


def _forget_logs_after(file: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (the checkpoint resumed from) from ``logs.jsonl``:
    the run that was killed logged them, and the resumed run logs those steps again."""
    if not file.is_file():
        return
    kept = []
    for line in file.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None  # a line cut short by the kill: dropped with the steps after
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
    atomic_write(file, lambda tmp: tmp.write_text("".join(kept)))


def _diverged(config: TrainConfig, exc: TrainingDiverged) -> str:
    """What a diverged run keeps and what to do: no model is saved; checkpoints are checked before
    they are written, so every one left is finite."""
    kept = last_checkpoint(config.output) if (config.output / "checkpoints").is_dir() else None
    lrs = f"lr_projection {config.lr_projection:g}, lr_lora {config.lr_lora:g}"
    if config.model.unfreeze_encoder_layers:
        lrs += f", lr_encoder {config.lr_encoder:g}"
    return (
        f"{exc.what}; no model was saved"
        + (f", the last checkpoint ({kept}) is finite" if kept else " (no checkpoint either)")
        + f"; lower the learning rates ({lrs}) or max_grad_norm ({config.max_grad_norm:g}) and train again "
        "with --overwrite"
    )


def _load_data(config: TrainConfig, registry, *, write_list: bool):
    """The train and validation splits; every bad image a dataset reported (refused or skipped)
    is listed in full in ``BAD_IMAGES_FILE`` in the run folder (messages name only a few)."""
    bad: dict[str, str] = {}
    splits = []
    try:
        for split in ("train", "validation"):
            data = load_split(config.datasets, split, seed=config.seed, registry=registry)
            parts = zip(getattr(data, "names", [None]), getattr(data, "datasets", [data]), strict=True)
            for name, part in parts:  # ids as a mix names them: <dataset>/<id>
                bad.update({f"{name}/{i}" if name else i: why for i, why in _problems(part).items()})
            splits.append(data)
    except BadImagesError as exc:
        if write_list:
            file = _write_bad(config, exc.problems)
            raise DataError(f"{exc}; all {len(exc.problems)} are listed in {file}") from exc
        raise
    if bad and write_list:
        log.info("%d bad images skipped; listed in %s", len(bad), _write_bad(config, bad))
    return splits


def _problems(data) -> dict[str, str]:
    info = getattr(data, "info", None)
    return dict(info.get("problems") or {}) if isinstance(info, dict) else {}


def _write_bad(config: TrainConfig, problems: dict[str, str]) -> Path:
    file = make_dirs(config.output) / BAD_IMAGES_FILE
    lines = [f"{tsv_field(image)}\t{tsv_field(why)}\n" for image, why in sorted(problems.items())]
    atomic_write(file, lambda tmp: tmp.write_text("image\tproblem\n" + "".join(lines)))
    return file


def _final_evaluation(trainer: Trainer) -> dict[str, float] | None:
    """The logged evaluation of the weights training ended with, when there is one.

    Training usually evaluates at its last step (or, keeping the best, at the best step): another
    ``evaluate()`` would repeat it, and with --eval-metrics that is captioning plus the Java scorers.
    """
    state = trainer.state
    loaded_best = trainer.args.load_best_model_at_end and state.best_model_checkpoint
    step = state.best_global_step if loaded_best else state.global_step
    for record in reversed(state.log_history):
        if record.get("step") == step and "eval_loss" in record:
            return {k: v for k, v in record.items() if k.startswith("eval_") or k == "epoch"}
    return None


def placement_record(placement: Placement) -> dict[str, str]:
    """What ``PLACEMENT_FILE`` holds: the device class and the precision (not the device index)."""
    return {"device_type": placement.device_type, "precision": placement.precision}


def recorded_placement(out: Path) -> dict[str, str] | None:
    """The placement a run in ``out`` recorded: its last checkpoint's, else the run's; ``None``
    for a run from before vlmkit recorded it (or none at all)."""
    checkpoint = last_checkpoint(out) if (out / "checkpoints").is_dir() else None
    for file in [*([Path(checkpoint) / PLACEMENT_FILE] if checkpoint else []), out / PLACEMENT_FILE]:
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("precision"), str):
            return record
    return None


def training_placement(
    config: TrainConfig, recorded: dict[str, str] | None = None, *, registry=None
) -> Placement:
    """The device and precision ``config`` asks for, ``auto`` resolved (``vlmkit.core.placement``);
    on ``--resume`` (``recorded``: what the run recorded) the run's own precision, kept.

    Under torchrun each rank takes the GPU of its local rank, so only ``auto`` or ``cuda`` fit.
    Outside it, ``Trainer`` always trains on the first visible GPU: another one is chosen with
    ``CUDA_VISIBLE_DEVICES``, not ``cuda:N``. A decoder plugin declaring ``fp16_safe = False``
    never gets fp16 (``auto`` picks fp32 on a GPU without bf16; ``fp16`` is refused).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if config.device.startswith("cuda:") and (distributed or config.device != "cuda:0"):
        raise ConfigError(
            f"device {config.device!r}: vlmkit train uses one GPU per process; pick it with "
            f"CUDA_VISIBLE_DEVICES={config.device.split(':')[1]} and --device cuda"
            + (" (under torchrun each rank takes its local rank's GPU)" if distributed else "")
        )
    precision = config.precision
    if recorded is not None:
        was = recorded["precision"]
        if precision not in ("auto", was):
            raise ConfigError(
                f"--resume: {config.output} was trained in {was}; resume it in {was} (--precision "
                f"{was} or auto), or --overwrite to train it again in {precision}"
            )
        precision = was
    spec = (registry or get_registry()).decoder(config.model.decoder) if config.model.decoder else None
    no_fp16 = None if getattr(spec, "fp16_safe", True) else spec.name

    def decide() -> Placement:
        return resolve(config.device, precision, cache_dir=config.cache_dir, no_fp16=no_fp16)

    if distributed and precision == "auto" and resolve_device(config.device) == "cpu":
        placement = _decided_on_rank_zero(decide)  # a measurement: ranks must not decide apart
    else:
        placement = decide()
    if placement.precision == "fp16" and placement.device_type == "cpu":
        raise ConfigError(
            "precision fp16 needs a GPU; on a CPU use bf16 or fp32"
            + (f" (--resume: {config.output} was trained in fp16 on a GPU)" if recorded else "")
        )
    if recorded is not None:
        placement = Placement(
            placement.device,
            placement.precision,
            f"the run's own precision, kept on --resume ({placement.reason})",
        )
        if recorded.get("device_type") not in (None, placement.device_type):
            warnings.warn(
                f"--resume: {config.output} was trained on {recorded['device_type']} and continues on "
                f"{placement.device_type}; its results will not equal an uninterrupted run's",
                VlmkitWarning,
                stacklevel=2,
            )
    return placement


def _decided_on_rank_zero(decide) -> Placement:
    """``decide()`` on rank 0, its placement on every rank. ``auto`` on a CPU is a timing, and ranks
    timing it apart could pick bf16 and fp32 in one run. The process group ``Trainer`` would set up
    for CPU training (gloo, from torchrun's environment) is set up here, a little earlier: its
    ``PartialState`` then uses it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            placement = decide()
            box = [("ok", placement.device, placement.precision, f"{placement.reason}; rank 0's choice")]
        except ConfigError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise ConfigError(box[0][1])
    return Placement(*box[0][1:])


def _training_arguments(config: TrainConfig, progress: bool, placement: Placement) -> TrainingArguments:
    metric = "eval_CIDEr" if config.eval_metrics else "eval_loss"
    eval_every = config.eval_every
    strategy = "steps" if eval_every else "epoch"
    save_every = config.save_every or eval_every
    best = bool(config.early_stopping_patience)
    if best and save_every and eval_every and save_every % eval_every:
        raise ConfigError("early stopping needs save_every to be a multiple of eval_every")
    on_cuda = placement.device_type == "cuda"
    args = TrainingArguments(
        output_dir=str(config.output / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(config.batch_size, 16),
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr_lora,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        max_grad_norm=config.max_grad_norm,
        bf16=placement.precision == "bf16",
        fp16=placement.precision == "fp16",  # with a GradScaler; LoRA and projection stay fp32
        # TF32 for what runs in fp32 (and all of "tf32"); bf16 on CUDA implies an Ampere+ card
        tf32=True if placement.precision == "tf32" or (on_cuda and placement.precision == "bf16") else None,
        eval_strategy=strategy,
        eval_steps=eval_every,
        save_strategy="steps" if save_every else "epoch",
        save_steps=save_every,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=best,
        metric_for_best_model=metric if best else None,
        greater_is_better=(metric != "eval_loss") if best else None,
        logging_steps=config.logging_steps,
        report_to=[],  # TensorBoard is added as a callback, writing to <output>/tensorboard
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=(workers := loader_workers(config, placement)),
        dataloader_persistent_workers=workers > 0,  # not restarted every epoch and evaluation
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=not progress,
        ddp_find_unused_parameters=False,
        # MPS when it is the device (Trainer picks it whenever use_cpu is off on a Mac)
        use_cpu=placement.device_type == "cpu",
    )
    if args.n_gpu > 1:  # Trainer would wrap the model in nn.DataParallel: one GPU instead
        args._n_gpu = 1
        log.info(
            "training on 1 of %d GPUs; use all with 'torchrun --nproc_per_node %d -m vlmkit.cli.main train ...'",
            torch.cuda.device_count(),
            torch.cuda.device_count(),
        )
    return args


def loader_workers(config: TrainConfig, placement: Placement) -> int:
    """``num_workers`` as set, else where workers pay (``benchmarks/scale.py``, RESULTS.md).

    From the feature cache a batch is a memmap slice and a tokenizer call (about a millisecond):
    workers cost more to start than they save. From images (an unfrozen encoder, or the cache
    off) a batch is decoded and preprocessed: workers overlap that with a GPU's step. On a CPU
    the training step already uses every core, and a worker only takes them from it.
    """
    if config.num_workers is not None:
        return config.num_workers
    from_cache = config.feature_cache and config.model.unfreeze_encoder_layers == 0
    if from_cache or placement.device_type == "cpu":
        return 0
    return min(4, (os.cpu_count() or 2) // 2)


def _tensorboard_callback(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        log.warning("tensorboard is not installed; logging to logs.jsonl only (pip install tensorboard)")
        return None
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))
    # it closes its writer when training ends and opens a new one for later logs (the final
    # evaluate) in logging_dir, by default a stray checkpoints/runs/<date>/: keep them together
    callback.logging_dir = str(folder)
    return callback


def steps_per_epoch(n_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    return math.ceil(n_examples / (config.batch_size * config.grad_accum * world_size))


__all__ = [
    "RUN_FILE",
    "TrainResult",
    "last_checkpoint",
    "prepare_output_dir",
    "run",
    "steps_per_epoch",
    "train",
]
