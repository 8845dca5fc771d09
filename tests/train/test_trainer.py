"""``VLMTrainer`` and its set-up (``vlmkit.train.trainer``): the loss of an accumulated step weighs
every caption token the same, the collator pads to what the device likes, the attention kernel is
the one asked for."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from vlmkit.core.errors import ConfigError
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import tiny_decoder_checkpoint, tiny_encoder_checkpoint
from vlmkit.train.config import TrainConfig
from vlmkit.train.data import Collator
from vlmkit.train.trainer import VLMTrainer, prepare_model_for_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: very different lengths: averaged per micro-batch, the short caption's tokens weigh 6x more
CAPTIONS = ["A dog.", "Two small red circles and one large blue square on the far left of a grey field."]


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_caption_tokens": 32,
    }


class Gradients(TrainerCallback):
    """Keeps the gradients of the first optimizer step (clipping is off)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def first_step_gradients(model_config, tmp_path, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # build's seed covers the projection; LoRA's init draws from the global RNG
    model = PrefixConditioningVLM.build(model_config, seed=0)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it weight so its gradients matter
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    features = torch.randn(
        2, model.encoder.num_tokens, model.encoder.feature_dim, generator=torch.Generator().manual_seed(1)
    )
    data = [{"caption": c, "features": f} for c, f in zip(CAPTIONS, features, strict=True)]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=1,
        max_grad_norm=0,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    grads = Gradients()
    config = TrainConfig(model=model_config, datasets=[{"name": "shapes"}])
    trainer = VLMTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=Collator(model),
        callbacks=[grads],
        vlm_config=config,
    )
    trainer.train()
    return grads.grads


def test_accumulated_micro_batches_give_the_gradients_of_one_batch(model_config, tmp_path):
    whole = first_step_gradients(model_config, tmp_path, batch_size=2, grad_accum=1)
    accumulated = first_step_gradients(model_config, tmp_path, batch_size=1, grad_accum=2)
    assert whole.keys() == accumulated.keys() and any("lora" in n for n in whole)
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_collator_pads_to_a_multiple_of_8_and_the_loss_does_not_change(model_config):
    torch.manual_seed(0)
    model = PrefixConditioningVLM.build(model_config, seed=0)
    features = torch.randn(2, model.encoder.num_tokens, model.encoder.feature_dim)
    items = [{"caption": c, "features": f} for c, f in zip(CAPTIONS, features, strict=True)]
    plain, padded = Collator(model)(items), Collator(model, pad_to_multiple_of=8)(items)
    width = plain["input_ids"].shape[1]
    assert width % 8 and padded["input_ids"].shape[1] == width + (-width % 8)
    tail = slice(width, None)
    assert (padded["attention_mask"][:, tail] == 0).all() and (padded["labels"][:, tail] == -100).all()
    assert not padded["image_mask"][:, tail].any()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded)["loss"], model(**plain)["loss"])


@pytest.mark.parametrize(
    ("asked", "precision", "expected"),
    [
        ("auto", "fp32", "sdpa"),
        ("auto", "bf16", "eager"),
        ("sdpa", "bf16", "sdpa"),
        ("eager", "fp32", "eager"),
    ],
)
def test_attn_implementation_is_used_as_asked_and_auto_keeps_the_cpu_rule(
    model_config, asked, precision, expected
):
    model = PrefixConditioningVLM.build(model_config, seed=0)
    prepare_model_for_precision(model, precision, "cpu", asked)
    assert model.language_model.config._attn_implementation == expected


def test_flash_attention_without_its_package_or_gpu_is_a_one_line_error(model_config):
    model = PrefixConditioningVLM.build(model_config, seed=0)
    with pytest.raises(
        ConfigError, match="flash_attention_2 (needs the flash-attn package|runs on a CUDA GPU)"
    ) as exc:
        prepare_model_for_precision(model, "bf16", "cpu", "flash_attention_2")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------ DeepSpeed configurations


def test_a_deepspeed_optimizer_section_is_refused_in_one_line():
    """With an optimizer section Trainer hands DeepSpeed a placeholder and DeepSpeed builds its own
    optimizer, one learning rate for every parameter: the per-part rates would be lost."""
    from vlmkit.train.distributed import check_deepspeed_config

    with_optimizer = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    }
    with pytest.raises(ConfigError, match="optimizer section.*lr_projection, lr_lora, lr_encoder") as exc:
        check_deepspeed_config(with_optimizer)
    assert "\n" not in str(exc.value)
    check_deepspeed_config({"zero_optimization": {"stage": 3}})  # what accelerate launch builds


def test_zero_offload_trains_with_deepspeeds_cpu_adam_and_the_per_part_learning_rates(
    model_config, monkeypatch
):
    """DeepSpeed refuses any optimizer but its CPU Adam under ZeRO-Offload (unless told to accept
    a slow one): vlmkit builds that one from its own parameter groups."""
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    import deepspeed.ops.adam

    from vlmkit.train.distributed import offloads_optimizer

    class CPUAdam:  # building the real one compiles DeepSpeed's C++ op
        def __init__(self, groups, adamw_mode):
            self.groups, self.adamw_mode = groups, adamw_mode

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", CPUAdam)
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert offloads_optimizer(offload)
    assert not offloads_optimizer(
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}
    )
    vlm = PrefixConditioningVLM.build(model_config)
    config = TrainConfig(model=model_config, datasets=[{"name": "shapes"}], lr_projection=3e-3, lr_lora=4e-4)

    def trainer(ds_config, deepspeed=True):
        fake = VLMTrainer.__new__(VLMTrainer)
        fake.model, fake.optimizer, fake.vlm_config, fake.is_deepspeed_enabled = vlm, None, config, deepspeed
        plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(config=ds_config))
        fake.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
        return fake

    optimizer = trainer(offload).create_optimizer()
    assert isinstance(optimizer, CPUAdam) and optimizer.adamw_mode
    assert [g["lr"] for g in optimizer.groups] == [3e-3, 4e-4]  # projection, LoRA
    assert isinstance(trainer({"zero_optimization": {"stage": 3}}).create_optimizer(), torch.optim.AdamW)
