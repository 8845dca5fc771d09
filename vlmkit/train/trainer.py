"""``VLMTrainer``: Hugging Face ``Trainer`` with per-part learning rates and checkpoints that hold
only the trainable tensors (projection, LoRA, unfrozen encoder layers), not the frozen base."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmkit.core.errors import ConfigError, TrainingDiverged, WriteError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.core.progress import progress_bar
from vlmkit.evaluate.loop import caption_and_score
from vlmkit.train.config import TrainConfig
from vlmkit.train.data import CaptionTrainingSet, LengthGroupedSampler, SamplerEpoch
from vlmkit.train.distributed import (
    OPTIMIZER_FILE,
    PLACEMENT_FILE,
    TRAINABLE_FILE,
    check_deepspeed_config,
    check_fsdp_applies,
    checkpoints_without_frozen_weights,
    fsdp1_root,
    generate_in_step,
    is_sharded,
    load_optimizer_state,
    load_trainable,
    offloads_optimizer,
    optimizer_state,
    trainable_state_dict,
    unsharded_root,
)

log = logging.getLogger(__name__)


def optimizer_param_groups(model: PrefixConditioningVLM, config: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group per trained part (projection, LoRA, unfrozen encoder layers), each with its
    own learning rate."""
    lrs = {"projection": config.lr_projection, "lora": config.lr_lora, "encoder": config.lr_encoder}
    return [
        {"params": params, "lr": lrs[name], "weight_decay": config.weight_decay}
        for name, params in model.trainable_parameter_groups().items()
        if params
    ]


def make_optimizer(param_groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW for ``param_groups``, fused (one kernel per tensor) on CUDA and on CPU.

    torch picks the per-tensor Python loop on CPU when not told otherwise; the LoRA adapter is
    a few hundred small tensors, and with several threads on a busy machine each of the ~10 ops
    per tensor can wait for a descheduled thread.
    """
    params = [p for group in param_groups for p in group["params"]]
    on_cpu = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu" for p in params)
    fused = {"fused": True} if torch.cuda.is_available() or on_cpu else {}
    return torch.optim.AdamW(param_groups, **fused, **kwargs)


def prepare_model_for_precision(
    model: PrefixConditioningVLM, precision: str, device_type: str, attn_implementation: str = "auto"
) -> None:
    """Set-up that depends on the training precision and device, and the attention kernel.

    ``attn_implementation`` other than ``auto`` is used as given (``sdpa``, ``eager``,
    ``flash_attention_2``; the last needs the flash-attn package, a CUDA device and bf16/fp16).
    It changes speed, not results, so it is a run setting and not saved with the model.

    ``auto`` is SDPA, except under bf16 autocast on a CPU: there the decoder's attention runs
    ``eager`` (matmul + fp32 softmax). PyTorch's CPU flash-attention kernel is about 4x slower than eager in bf16 for the
    short sequences of captioning (60 tokens: 15 vs 4 ms per layer, forward + backward, batch 8,
    measured on an AVX512-BF16 CPU; ``benchmarks/train_throughput.py --variants``), about 10% of
    a training step. In fp32 the two are even, and on GPUs SDPA is the right choice. Keyed on the
    device the run trains on (``device_type``: cpu, cuda, mps), not on what the machine has.
    """
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                "use sdpa or auto"
            )
        if device_type != "cuda" or precision not in ("bf16", "fp16"):
            raise ConfigError(
                f"attn_implementation flash_attention_2 runs on a CUDA GPU in bf16 or fp16, not on "
                f"{device_type} in {precision}; use sdpa or auto"
            )
    if attn_implementation != "auto":
        model.language_model.set_attn_implementation(attn_implementation)
    elif precision == "bf16" and device_type == "cpu":
        model.language_model.set_attn_implementation("eager")


class VLMTrainer(Trainer):
    """``Trainer`` with per-part learning rates and checkpoints of trainable tensors only."""

    def __init__(
        self, *args, vlm_config: TrainConfig, eval_captions=None, placement: dict | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        check_fsdp_applies(self)
        # one bar of our own (``disable_tqdm``: none); Trainer's would print every log as a raw dict
        for default in (PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK):
            self.remove_callback(default)
        self.progress = None if self.args.disable_tqdm else TrainingProgress()
        if self.progress is not None:
            self.add_callback(self.progress)
        if self.is_deepspeed_enabled:
            check_deepspeed_config(self._deepspeed_config())
        self.vlm_config = vlm_config
        self.placement = placement  # written into each checkpoint: --resume continues in it
        self.eval_captions = eval_captions  # (CaptionDataset, features or None) for --eval-metrics
        self.length_sampler: LengthGroupedSampler | None = None
        self.add_callback(SamplerEpoch(self))
        self._bad_loss: float | None = None  # a non-finite loss since the last optimizer step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Trainer's logging would silently replace a NaN loss by the running mean; it syncs on
        # this value every step already (logging_nan_inf_filter), so the check costs nothing more
        if self._bad_loss is None and not torch.isfinite(loss).all():
            self._bad_loss = loss.float().sum().item()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's global gradient norm, computed right before each optimizer step: the place to
        stop a diverged run while the weights (and every checkpoint) are still finite."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        bad_loss = _on_any_rank(self._bad_loss, self.args.device)
        self._bad_loss = None
        step = self.state.global_step + 1
        if bad_loss is not None:
            raise TrainingDiverged(step, f"the loss is {bad_loss}")
        norm = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
        # fp16: an overflowing gradient is routine, the GradScaler skips that step and scales down
        if norm is not None and not math.isfinite(norm) and not self.args.fp16:
            raise TrainingDiverged(step, f"the gradient norm is {norm}")
        return grad_norm

    def check_weights_finite(self) -> None:
        """``TrainingDiverged`` when a trained tensor holds NaN or inf (a step with a huge learning
        rate); every rank calls it (a collective under torch.distributed)."""
        if not _finite_everywhere([p for p in self.model.parameters() if p.requires_grad], self.args.device):
            raise TrainingDiverged(self.state.global_step, "the trained weights are no longer finite numbers")

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from vlmkit.core.paths import writing

        self.check_weights_finite()  # a checkpoint is never written from diverged weights
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        new = not folder.exists()
        try:
            with writing(folder):  # a full disk: one line naming the checkpoint; earlier ones stay
                super()._save_checkpoint(model, trial)
        except WriteError:
            if new and self.args.should_save:  # half a checkpoint only takes the room that is left
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # also when it stops with an exception (Ctrl-C): the terminal gets its cursor back
            if self.progress is not None:
                self.progress.close()

    def _get_train_sampler(self, train_dataset=None):
        """With ``group_by_length``, batches of similar caption length: see ``LengthGroupedSampler``."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.vlm_config.group_by_length and isinstance(dataset, CaptionTrainingSet):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.length_sampler = LengthGroupedSampler(dataset, batch, seed=seed)
            return self.length_sampler
        return super()._get_train_sampler(train_dataset)

    def _deepspeed_config(self) -> dict:
        return self.accelerator.state.deepspeed_plugin.hf_ds_config.config

    def create_optimizer(self, model=None):
        # Trainer passes the prepared model when it creates the optimizer late (FSDP)
        if self.optimizer is None:
            model = self.accelerator.unwrap_model(model) if model is not None else self.model
            groups = optimizer_param_groups(model, self.vlm_config)
            if self.is_deepspeed_enabled and offloads_optimizer(self._deepspeed_config()):
                # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam, and refuses any other
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                self.optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True)
            else:
                self.optimizer = make_optimizer(groups)
        return self.optimizer

    def _gather_target(self):
        """The model to gather trainable tensors from or load them into: under FSDP1 the wrapped
        root (its units gather their full parameters), else the unwrapped model."""
        return self.model if fsdp1_root(self.model) is not None else self.accelerator.unwrap_model(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP and DeepSpeed ZeRO-3, every rank gathers the trainable tensors alone
        (``trainable_state_dict``) and the saving rank writes them. ``Trainer`` would gather the
        whole model first (the frozen base and encoder: what did not fit on one GPU), and under
        accelerate's FSDP2 default (``SHARDED_STATE_DICT``) never call ``_save`` at all."""
        if not (self.is_fsdp_enabled or is_sharded(self.accelerator.unwrap_model(self.model))):
            return super().save_model(output_dir, _internal_call)
        tensors = trainable_state_dict(self._gather_target())  # a collective: every rank is here
        self._save(output_dir, state_dict=tensors)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP, the optimizer's full state (``optimizer.pt``, trainable parameters only, by
        name: whatever ``fsdp_state_dict_type`` says) and the schedule. ``Trainer`` would write the
        whole model again (``save_fsdp_model``: the frozen base in every checkpoint), and FSDP1's
        optimizer file as large as the flat parameters; the trainable tensors are in
        ``trainable.safetensors``, and resuming loads them from there."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import SCHEDULER_NAME

        from vlmkit.core.paths import atomic_write

        state = optimizer_state(self.model, self.optimizer)  # a collective: every rank is here
        if self.args.should_save:
            output = Path(output_dir)
            output.mkdir(parents=True, exist_ok=True)
            atomic_write(output / OPTIMIZER_FILE, lambda tmp: torch.save(state, tmp))
            torch.save(self.lr_scheduler.state_dict(), output / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if not (self.is_fsdp_enabled and checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        folder = Path(checkpoint)
        if not (folder / OPTIMIZER_FILE).is_file():
            raise ConfigError(
                f"checkpoint {checkpoint} has no {OPTIMIZER_FILE}; it was not written by vlmkit train"
            )
        load_optimizer_state(self.model, self.optimizer, folder / OPTIMIZER_FILE)
        self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The trainable tensors, written by the saving rank only and atomically (a temporary name,
        then a rename), from the gathered ``state_dict`` when one is passed (``save_model`` under
        FSDP and ZeRO-3; ``Trainer`` under ZeRO-2); called on every rank under those."""
        from safetensors.torch import save_file

        from vlmkit.core.paths import atomic_write, write_json

        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and is_sharded(model):
            # gathering shards takes every rank, and only this one is here
            raise ConfigError(
                "the model is sharded but no gathered state dict was passed: save it with save_model, "
                "which every rank calls"
            )
        tensors = trainable_state_dict(model, state_dict)
        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        if self.placement is not None:
            write_json(output / PLACEMENT_FILE, self.placement)
        atomic_write(output / TRAINABLE_FILE, lambda tmp: save_file(tensors, str(tmp)))

    @property
    def deepspeed(self):
        return self.__dict__.get("_deepspeed_engine")

    @deepspeed.setter
    def deepspeed(self, engine) -> None:
        # Trainer keeps the DeepSpeed engine here before it resumes or saves anything
        if engine is not None:
            checkpoints_without_frozen_weights(engine)
        self.__dict__["_deepspeed_engine"] = engine

    def _load_trainable(self, checkpoint: str | Path) -> None:
        from safetensors.torch import load_file

        file = Path(checkpoint) / TRAINABLE_FILE
        if not file.is_file():
            raise ConfigError(
                f"checkpoint {checkpoint} has no {TRAINABLE_FILE}; it was not written by vlmkit train"
            )
        load_trainable(self._gather_target(), load_file(str(file)), source=f"checkpoint {checkpoint}")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        self._load_trainable(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            log.info("loading the best checkpoint %s", self.state.best_model_checkpoint)
            self._load_trainable(self.state.best_model_checkpoint)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self.vlm_config.eval_metrics and self.eval_captions is not None:
            prefix = kwargs.get("metric_key_prefix", "eval")
            output.metrics.update({f"{prefix}_{k}": v for k, v in self.caption_metrics().items()})
        return output

    def caption_metrics(self) -> dict[str, float]:
        """``--eval-metrics``: caption the validation examples and score them (every rank calls it).

        On the training device (the model moves the cached CPU features) under its autocast;
        FSDP2: generate is not forward, so nothing else unshards the root. Each rank captions its
        share, stepping until every rank is done when the model is sharded; rank 0 scores; every
        rank gets the same metrics (early stopping)."""
        data, features = self.eval_captions
        model = self._gather_target()  # FSDP1: the root unit holds the encoder, projection, embeddings
        with self.autocast_smart_context_manager(), unsharded_root(model):
            return caption_and_score(
                model,
                data,
                features=features,
                batch_size=self.args.per_device_eval_batch_size,
                limit=self.vlm_config.max_eval_samples,
                **generate_in_step(model),
            )


def _on_any_rank(value: float | None, device) -> float | None:
    """``value`` when set on this rank, else the first rank's that has one (``nan`` stands in
    for another rank's value); ``None`` when no rank has one. Outside torch.distributed, ``value``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([0.0 if value is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return value if value is not None else (float("nan") if flag.item() else None)


def _finite_everywhere(params: list[torch.Tensor], device) -> bool:
    """Whether every element of ``params`` is finite, on every rank: each checks its own shard
    (FSDP's local tensor, DeepSpeed ZeRO-3's partition), then the ranks agree."""
    import torch.distributed as dist

    local = []
    for p in params:
        t = getattr(p, "ds_tensor", None)
        t = t if t is not None else (p.to_local() if hasattr(p, "to_local") else p)
        if t.numel():
            local.append(torch.isfinite(t.detach()).all())
    finite = torch.stack(local).all() if local else torch.tensor(True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = finite.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(finite.item())


class JsonlLogger(TrainerCallback):
    """Appends every log record (loss, learning rates, eval metrics) to ``logs.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            from vlmkit.core.paths import writing

            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with writing(self.path), self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


class TrainingProgress(TrainerCallback):
    """One bar on stderr while training: step of all, loss, learning rate, samples/s, time left.

    Trainer's own progress output (a tqdm bar and every log record printed as a raw dict) is
    replaced by this; the records go to logs.jsonl (``JsonlLogger``) and TensorBoard instead.
    """

    def __init__(self) -> None:
        self._bar = contextlib.ExitStack()
        self._advance = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        columns = ("loss", "lr", "speed")
        self._advance = self._bar.enter_context(
            progress_bar(
                "training", state.max_steps, start=state.global_step, columns=columns, transient=False
            )
        )
        self._started, self._first_step = time.perf_counter(), state.global_step
        self._per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_step_end(self, args, state, control, **kwargs):
        if self._advance is not None:
            steps = state.global_step - self._first_step
            rate = steps * self._per_step / max(time.perf_counter() - self._started, 1e-9)
            self._advance(1, speed=f"{rate:.1f} samples/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._advance is not None and logs and "loss" in logs:
            lr = logs.get("learning_rate")
            self._advance(0, loss=f"loss {logs['loss']:.4f}", lr=f"lr {lr:.2e}" if lr is not None else "")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bar (also when training stops with an exception: ``VLMTrainer.train``)."""
        self._advance = None
        self._bar.close()
