"""``vlmkit train``: fit the projection and the LoRA adapter with Hugging Face ``Trainer``.

``Trainer`` gives us gradient accumulation, schedules, checkpoints and resume, evaluation,
logging, and distributed training (``torchrun``/``accelerate launch``: DDP, FSDP, DeepSpeed)
with no code of ours. What is ours:

- Features from a frozen encoder come from the on-disk cache (``features.py``), computed once
  (on rank 0 under torchrun) and read every epoch: the encoder never runs in the training loop.
- Checkpoints hold only the trainable tensors (projection, LoRA, unfrozen encoder layers), not
  the frozen base weights, so they are megabytes, not gigabytes.
- The output folder is a model artifact (``vlmkit.json`` ...), with ``checkpoints/``,
  ``logs.jsonl``, ``tensorboard/`` and ``run.yaml`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from vlmkit.core.config import TrainConfig
from vlmkit.core.errors import ConfigError, VlmkitWarning
from vlmkit.core.model import MANIFEST, PrefixConditioningVLM

log = logging.getLogger(__name__)

RUN_FILE = "run.yaml"
#: length grouping tells captions apart only in steps of this many characters (~4 tokens). Sorting
#: by exact length made every batch of the shapes demo one caption class (length follows colour
#: and shape words) and cost it 37 points of exact match at 100 steps (63% vs 100%); with buckets
#: its captions (25-31 characters) share one bucket and batches stay random. Wherever length
#: follows content this risk remains, so grouping is opt-in (``group_by_length``).
LENGTH_BUCKET = 16
TRAINABLE_FILE = "trainable.safetensors"
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


# ------------------------------------------------------------------------------- data


def load_split(config: TrainConfig, split: str, registry=None):
    """The mixed split of every configured dataset (one dataset is returned as it is)."""
    from vlmkit.core.datasets import mix
    from vlmkit.core.registry import get_registry

    registry = registry or get_registry()
    parts = []
    for entry in config.datasets:
        spec = registry.dataset(entry.name)
        parts.append((entry.name, spec.load(split, entry.options, seed=config.seed)))
    if len(parts) == 1:
        return parts[0][1]
    return mix([data for _, data in parts], names=[name for name, _ in parts])


class CaptionTrainingSet(torch.utils.data.Dataset):
    """Examples as the collator wants them: one reference caption (a random one of several,
    re-drawn every time the example is seen) and either cached features or pixel values."""

    def __init__(self, data, features=None, preprocess=None, limit: int | None = None) -> None:
        self.data = data
        self.features = features
        self.preprocess = preprocess
        self.length = min(len(data), limit) if limit else len(data)

    def __len__(self) -> int:
        return self.length

    def caption_lengths(self) -> list[int]:
        """Each example's mean reference length in characters: a free stand-in for its token
        count (no tokenizer pass over the dataset), used to batch similar lengths together."""
        lengths = []
        for index in range(self.length):
            captions = self.data[index].captions
            lengths.append(round(sum(len(c) for c in captions) / max(len(captions), 1)))
        return lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.data[index]
        item: dict[str, Any] = {"caption": random.choice(example.captions)}
        if self.features is not None:
            item["features"] = torch.from_numpy(self.features[index].astype("float32"))
        else:
            item["pixel_values"] = self.preprocess([example.load_image()])[0]
        return item


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar caption length (``group_by_length``), in a fresh order every epoch.

    Lengths are counted in buckets of ``LENGTH_BUCKET`` characters. Each epoch the indices are
    shuffled, cut into groups of ``min(n // (4 * batch_size), 50)`` batches, and sorted by bucket
    within each group (transformers' ``get_length_grouped_indices``; the sort is stable, so the
    examples of one bucket stay in random order). The order of epoch ``e`` depends only on
    ``seed`` and ``e``, so a resumed run skips exactly the batches it had trained.
    """

    def __init__(self, dataset: CaptionTrainingSet, batch_size: int, seed: int = 0) -> None:
        self.buckets = [length // LENGTH_BUCKET for length in dataset.caption_lengths()]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.buckets, self.batch_size, generator=generator))


class _SamplerEpoch(TrainerCallback):
    """Tells the length-grouped sampler which epoch starts, also after a resume mid-epoch (where
    accelerate's ``set_epoch`` does not reach a sampler behind its skip and shard wrappers)."""

    def __init__(self, trainer: VLMTrainer) -> None:
        self.trainer = weakref.ref(trainer)

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer()
        sampler = getattr(trainer, "length_sampler", None)
        if sampler is not None:  # state.epoch is exactly 0, 1.0, 2.0 at epoch starts, 1.33 on resume
            sampler.set_epoch(math.floor(state.epoch))


class Collator:
    """Tokenizes captions around the image slots (see ``PrefixConditioningVLM.tokenize``)."""

    def __init__(self, model: PrefixConditioningVLM) -> None:
        self.model = model

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.model.tokenize([it["caption"] for it in items]).to_dict()
        key = "features" if "features" in items[0] else "pixel_values"
        batch[key] = torch.stack([it[key] for it in items])
        return batch


# ------------------------------------------------------------------------------- trainer


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


def prepare_model_for_precision(model: PrefixConditioningVLM, precision: str) -> None:
    """Set-up that depends on the training precision and device.

    bf16 autocast on CPU: the decoder's attention runs ``eager`` (matmul + fp32 softmax) instead
    of SDPA. PyTorch's CPU flash-attention kernel is about 4x slower than eager in bf16 for the
    short sequences of captioning (60 tokens: 15 vs 4 ms per layer, forward + backward, batch 8,
    measured on an AVX512-BF16 CPU; ``benchmarks/train_throughput.py --variants``), about 10% of
    a training step. In fp32 the two are even, and on GPUs SDPA is the right choice.
    """
    if precision == "bf16" and not torch.cuda.is_available():
        model.lm.get_base_model().set_attn_implementation("eager")


class VLMTrainer(Trainer):
    """``Trainer`` with per-part learning rates and checkpoints of trainable tensors only."""

    def __init__(self, *args, vlm_config: TrainConfig, eval_captions=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vlm_config = vlm_config
        self.eval_captions = eval_captions  # (CaptionDataset, features or None) for --eval-metrics
        self.length_sampler: LengthGroupedSampler | None = None
        self.add_callback(_SamplerEpoch(self))

    def _get_train_sampler(self, train_dataset=None):
        """With ``group_by_length``, batches of similar caption length: see ``LengthGroupedSampler``."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.vlm_config.group_by_length and isinstance(dataset, CaptionTrainingSet):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.length_sampler = LengthGroupedSampler(dataset, batch, seed=seed)
            return self.length_sampler
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        # Trainer passes the prepared model when it creates the optimizer late (FSDP)
        if self.optimizer is None:
            model = self.accelerator.unwrap_model(model) if model is not None else self.model
            self.optimizer = make_optimizer(optimizer_param_groups(model, self.vlm_config))
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from safetensors.torch import save_file

        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(output / TRAINABLE_FILE))

    def _load_trainable(self, checkpoint: str | Path) -> None:
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        file = Path(checkpoint) / TRAINABLE_FILE
        if not file.is_file():
            raise ConfigError(
                f"checkpoint {checkpoint} has no {TRAINABLE_FILE}; it was not written by vlmkit train"
            )
        tensors = load_file(str(file))
        params = dict(model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ConfigError(f"checkpoint {checkpoint} does not fit this model (e.g. {unknown[0]})")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

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
            scores = caption_metrics(
                self.accelerator.unwrap_model(self.model),
                *self.eval_captions,
                batch_size=self.args.per_device_eval_batch_size,
                limit=self.vlm_config.max_eval_samples,
            )
            output.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return output


def caption_metrics(
    model, data, features=None, *, batch_size: int = 32, limit: int | None = None
) -> dict[str, float]:
    """Greedy captions for ``data`` scored against all its references (BLEU, METEOR, ROUGE-L, CIDEr)."""
    from vlmkit.core.metrics import exact_match, score_captions

    n = min(len(data), limit) if limit else len(data)
    predictions, references = {}, {}
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        examples = [data[i] for i in idx]
        if features is not None:
            feats = torch.from_numpy(features[idx[0] : idx[-1] + 1].astype("float32"))
            captions = model.generate(features=feats)
        else:
            captions = model.generate([ex.load_image() for ex in examples])
        for ex, text in zip(examples, captions, strict=True):
            predictions[ex.id] = text
            references[ex.id] = list(ex.captions)
    scores = score_captions(predictions, references)
    scores["exact_match"] = exact_match(predictions, references)
    return scores


class JsonlLogger(TrainerCallback):
    """Appends every log record (loss, learning rates, eval metrics) to ``logs.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------- the job


def prepare_output_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding another run is never silently reused or deleted."""
    out = config.output_dir
    run_file = out / RUN_FILE
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise ConfigError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return
    if not run_file.is_file():
        raise ConfigError(
            f"output folder {out} is not empty and holds no vlmkit run; choose another --output"
        )
    if overwrite:
        shutil.rmtree(out)
        return
    previous = yaml.safe_load(run_file.read_text()) or {}
    current = json.loads(config.model_dump_json())
    differs = [d for k in IDENTITY_FIELDS for d in _differences(previous.get(k), current.get(k), k)]
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
    order = [
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


def _differences(before: Any, now: Any, key: str) -> list[str]:
    """``key.sub: before -> now`` for every leaf setting that changed."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in {**before, **now} for d in _differences(before.get(k), now.get(k), f"{key}.{k}")]
    return [] if before == now else [f"{key}: {json.dumps(before)} -> {json.dumps(now)}"]


def last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = output_dir / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    registry=None,
    callbacks: list | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model as ``config`` says and write the artifact to ``config.output_dir``."""
    from transformers import set_seed

    from vlmkit.core.features import FeatureCache

    started = time.perf_counter()
    out = config.output_dir
    args = _training_arguments(config, progress)  # sets up torch.distributed under torchrun
    refusal = None
    if args.process_index == 0:
        try:
            prepare_output_dir(config, resume=resume, overwrite=overwrite)
        except ConfigError as exc:
            refusal = str(exc)
    # every rank raises the refusal: one that waited at a barrier instead would hang until timeout
    if (refusal := _from_rank_zero(refusal)) is not None:
        raise ConfigError(refusal)
    set_seed(config.seed)

    model = PrefixConditioningVLM.build(config.model, registry=registry, seed=config.seed)
    prepare_model_for_precision(model, config.precision)
    train_data = load_split(config, "train", registry)
    eval_data = load_split(config, "validation", registry)
    use_cache = config.feature_cache and model.encoder_frozen
    train_features = eval_features = None
    if use_cache:
        cache = FeatureCache(config.cache_dir)
        train_features = cache.features_for(model.encoder, train_data, progress=progress)
        eval_features = cache.features_for(model.encoder, eval_data, progress=progress)
    preprocess = None if use_cache else model.preprocess
    train_set = CaptionTrainingSet(train_data, train_features, preprocess, config.max_train_samples)
    eval_set = CaptionTrainingSet(eval_data, eval_features, preprocess, config.max_eval_samples)
    if args.process_index == 0:
        # written once the model and the data have loaded: a run that fails to start (a bad image,
        # a wrong checkpoint) leaves no run.yaml, so the corrected command needs no --overwrite
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))

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
        data_collator=Collator(model),
        callbacks=cbs,
        vlm_config=config,
        eval_captions=(eval_data, eval_features) if config.eval_metrics else None,
    )
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(
                f"--resume: {out / 'checkpoints'} holds no checkpoint yet; use --overwrite to start over"
            )
        log.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = {}
    if config.eval_metrics or config.early_stopping_patience:
        eval_metrics = _final_evaluation(trainer) or trainer.evaluate()

    if trainer.is_world_process_zero():
        model.save(
            out,
            training={
                "config": json.loads(config.model_dump_json()),
                "global_step": trainer.state.global_step,
                "train_loss": result.training_loss,
                "eval": eval_metrics,
                "used_feature_cache": use_cache,
            },
        )
    _barrier()
    return TrainResult(
        output_dir=out,
        global_step=trainer.state.global_step,
        train_loss=result.training_loss,
        samples_per_second=result.metrics.get("train_samples_per_second"),
        seconds=time.perf_counter() - started,
        eval_metrics=eval_metrics,
        used_feature_cache=use_cache,
    )


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


def _training_arguments(config: TrainConfig, progress: bool) -> TrainingArguments:
    metric = "eval_CIDEr" if config.eval_metrics else "eval_loss"
    eval_every = config.eval_every
    strategy = "steps" if eval_every else "epoch"
    save_every = config.save_every or eval_every
    best = bool(config.early_stopping_patience)
    if best and save_every and eval_every and save_every % eval_every:
        raise ConfigError("early stopping needs save_every to be a multiple of eval_every")
    return TrainingArguments(
        output_dir=str(config.output_dir / "checkpoints"),
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
        bf16=config.precision == "bf16",
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
        dataloader_num_workers=config.num_workers,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=not progress,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )


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


def _from_rank_zero(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (``value`` itself outside torchrun)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def steps_per_epoch(n_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    return math.ceil(n_examples / (config.batch_size * config.grad_accum * world_size))


__all__ = ["MANIFEST", "TrainResult", "train", "prepare_output_dir", "last_checkpoint", "caption_metrics"]
