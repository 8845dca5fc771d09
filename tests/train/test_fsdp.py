"""FSDP with 2 gloo CPU processes, FSDP2 (``fully_shard``) and FSDP1 (``use_orig_params=True``):
train, checkpoint the gathered trainable tensors and the optimizer's state, get killed (SIGKILL to
both ranks, forked from this process) after the checkpoint, resume into a freshly built and sharded model,
finish training, caption and score under sharding, save the artifact. The artifact loads in one
process and captions like the same training without sharding; the metrics are one process's.

Both ranks see the same batch, so the averaged gradient is the one-process gradient and the
sharded run must match the unsharded one up to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_sharded import assert_artifact_matches, tiny_sharded_config

from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images
from vlmkit.train.distributed import (
    checkpoint_names,
    generate_in_step,
    is_sharded,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    save_model,
    shard_model,
    trainable_state_dict,
    unsharded_root,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT_S = 120
STEPS, CHECKPOINT_AT = 4, 2
CAPTIONS = ["A red circle on the left.", "A blue square on the right."]
EVAL = 5  # odd: the ranks' shares differ in size
SHAPES = {"size": 72, "image_size": 32}


def optimizer_for(vlm):
    # SGD with momentum: the resumed run needs the optimizer's state, and Adam would blow float
    # noise on ~0 gradients up to lr
    return torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.3, momentum=0.9)


def train(vlm, optimizer, pixels, steps):
    """SGD steps on one batch: the same in the sharded workers and in this process."""
    batch = vlm.tokenize(CAPTIONS)
    for _ in steps:
        vlm.train()
        loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.eval()


def eval_data():
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train.config import DatasetConfig

    return load_split([DatasetConfig(name="shapes", options=SHAPES)], "validation")


def wrap(vlm, kind):
    if kind == "fsdp2":
        return shard_model(vlm)
    # FSDP1 as accelerate wraps it: one unit per decoder block (_no_split_modules), then the root
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(m) for m in vlm.modules() if type(m).__name__ in vlm._no_split_modules}
    return FullyShardedDataParallel(
        vlm, auto_wrap_policy=ModuleWrapPolicy({*blocks}), use_orig_params=True, device_id=torch.device("cpu")
    )


def rank_main(rank: int, world: int, config: dict, root: str, phase: str) -> None:
    """One rank, forked: FSDP2 then FSDP1 in one process group (starting processes is most of
    the time). ``first``: train, checkpoint, one step more, then wait to be killed. ``resume``:
    a fresh model resumed from the checkpoint, trained to the end, captioned, scored, saved."""
    import shutil
    import sys
    import warnings

    import torch.distributed as dist

    from vlmkit.evaluate.loop import caption_and_score

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    which = shutil.which  # no Java scorers: the pure-Python tokenizer, no METEOR (as in one process)
    shutil.which = lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    warnings.simplefilter("ignore")
    sys.stderr = open(f"{root}/{phase}-{rank}.log", "w")  # noqa: SIM115 - the process's own stderr
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{phase}", rank=rank, world_size=world)
    if phase == "first":
        for kind in KINDS:
            torch.manual_seed(0)  # build(seed=) seeds the projection; LoRA draws from the global RNG
            vlm = wrap(PrefixConditioningVLM.build(config, seed=0), kind)
            assert is_sharded(vlm)
            pixels = vlm.preprocess(sample_images(2))
            optimizer = optimizer_for(vlm)
            train(vlm, optimizer, pixels, range(CHECKPOINT_AT))
            save_checkpoint(vlm, optimizer, f"{root}/{kind}/checkpoint")
            train(vlm, optimizer, pixels, range(1))  # past the checkpoint ...
        Path(f"{root}/past-checkpoint-{rank}").touch()
        time.sleep(600)  # ... and killed here by the test
        raise SystemExit("not killed")

    for kind in KINDS:
        out = f"{root}/{kind}"
        # resumed: another initialisation, sharded, then the checkpoint loaded into its shards
        torch.manual_seed(1)
        vlm = wrap(PrefixConditioningVLM.build(config, seed=1), kind)
        pixels = vlm.preprocess(sample_images(2))
        optimizer = optimizer_for(vlm)
        load_checkpoint(vlm, optimizer, out + "/checkpoint")
        train(vlm, optimizer, pixels, range(CHECKPOINT_AT, STEPS))
        mine = pixels[rank : rank + 1]  # each rank captions its own image: they may stop at different steps
        with unsharded_root(vlm):
            ids = vlm.generate(pixel_values=mine, return_ids=True, max_new_tokens=8, **generate_in_step(vlm))
            metrics = caption_and_score(vlm, eval_data(), batch_size=2, limit=EVAL, **generate_in_step(vlm))
        save_model(vlm, out + "/model")  # every rank: gathered, written by rank 0
        dist.barrier()
        Path(f"{out}/rank-{rank}.json").write_text(json.dumps({"ids": ids, "metrics": metrics}))
    dist.destroy_process_group()


KINDS = ("fsdp2", "fsdp1")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return tiny_sharded_config(root)


def test_model_declares_its_decoder_block_for_fsdp(config):
    vlm = PrefixConditioningVLM.build(config)
    assert vlm._no_split_modules == ["LlamaDecoderLayer"]  # transformers/accelerate auto-wrap read it


def test_a_misspelt_layer_class_fails_at_build_time(config):
    from vlmkit.core.errors import PluginError
    from vlmkit.core.registry import get_registry
    from vlmkit.plugins.decoders.smollm import SmolLMDecoder
    from vlmkit.testing import make_registry

    class Misspelt(SmolLMDecoder):
        layer_class = "LlamaDecoderLayr"

    registry = make_registry(get_registry().encoder("siglip"), Misspelt())
    with pytest.raises(PluginError, match="declares layer_class LlamaDecoderLayr.*LlamaDecoderLayer") as exc:
        PrefixConditioningVLM.build(config, registry=registry)
    assert "\n" not in str(exc.value)


def logs(out, phase: str) -> str:
    return "\n".join(f.read_text()[-3000:] for f in sorted(out.glob(f"{phase}-*.log")))


def kill_after_checkpoint(torchrun, config, out):
    """The first run's ranks, SIGKILLed once both are past their checkpoints."""
    procs = torchrun.fork(rank_main, config, str(out), "first")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not all((out / f"past-checkpoint-{rank}").exists() for rank in (0, 1)):
            if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                pytest.fail(f"the first run ended or stalled before its checkpoint:\n{logs(out, 'first')}")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [-signal.SIGKILL] * 2


@pytest.fixture(scope="module")
def resumed(torchrun, config, tmp_path_factory):
    """FSDP2 and FSDP1 runs killed after a checkpoint, then resumed: ``<folder>/<kind>/``."""
    out = tmp_path_factory.mktemp("killed-and-resumed")
    kill_after_checkpoint(torchrun, config, out)
    codes = torchrun.join(torchrun.fork(rank_main, config, str(out), "resume"), timeout=TIMEOUT_S)
    assert codes == [0, 0], logs(out, "resume")
    return out


@pytest.fixture(scope="module")
def reference(config):
    """The same training in one process without sharding: the model and its metrics."""
    import shutil

    from vlmkit.evaluate.loop import caption_and_score

    torch.manual_seed(0)  # as in the workers
    vlm = PrefixConditioningVLM.build(config, seed=0)
    pixels = vlm.preprocess(sample_images(2))
    train(vlm, optimizer := optimizer_for(vlm), pixels, range(STEPS))
    del optimizer
    which = shutil.which
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="java not found"):
        mp.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
        metrics = caption_and_score(vlm, eval_data(), batch_size=2, limit=EVAL)
    return vlm, pixels, metrics


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_fsdp_killed_after_a_checkpoint_resumes_and_ends_like_one_process(resumed, reference, kind):
    tmp_path = resumed / kind

    vlm, pixels, metrics = reference
    want = trainable_state_dict(vlm)
    saved = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    assert sorted(saved) == sorted(checkpoint_names(vlm))  # full names, without FSDP1's wrappers
    assert any(name.startswith("encoder.") for name in saved)  # the unfrozen encoder block too
    for name, value in want.items():
        assert value.shape == saved[name].shape, name  # full tensors, not shards
    optimizer = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == sum(p.requires_grad for p in vlm.parameters())  # momentum of each

    reference_ids = assert_artifact_matches(tmp_path / "model", vlm, want, pixels, CAPTIONS)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank in (0, 1):  # generated under sharding, one image per rank
        assert ranks[rank]["ids"] == reference_ids[rank : rank + 1]
    # evaluation under sharding: every rank has the metrics of one process
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == pytest.approx(metrics)


def test_load_trainable_refuses_tensors_of_another_model(config):
    vlm = PrefixConditioningVLM.build(config)
    from vlmkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit this model"):
        load_trainable(vlm, {"projection.nonsense": torch.zeros(1)})


# ------------------------------------------------------------------------------ VLMTrainer._save


def fake_trainer(vlm, *, should_save: bool):
    """What ``VLMTrainer._save`` reads of ``self``: the args and the accelerator."""
    from types import SimpleNamespace

    return SimpleNamespace(
        model=vlm,
        args=SimpleNamespace(should_save=should_save, output_dir="unused"),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        placement=None,
    )


def test_save_writes_on_the_saving_rank_only_and_from_the_gathered_state_dict(config, tmp_path):
    from vlmkit.train.trainer import TRAINABLE_FILE, VLMTrainer

    vlm = PrefixConditioningVLM.build(config)
    VLMTrainer._save(fake_trainer(vlm, should_save=False), str(tmp_path / "other-rank"))
    assert not (tmp_path / "other-rank").exists()  # ranks that do not save write nothing

    # FSDP/DeepSpeed: Trainer hands over the gathered state dict; it, not the module, is saved
    gathered = {k: v.clone() for k, v in vlm.state_dict().items()}
    name = next(n for n, p in vlm.named_parameters() if p.requires_grad)
    gathered[name] = torch.full_like(gathered[name], 7.0)
    VLMTrainer._save(fake_trainer(vlm, should_save=True), str(tmp_path / "ckpt"), state_dict=gathered)
    saved = load_file(str(tmp_path / "ckpt" / TRAINABLE_FILE))
    assert sorted(saved) == sorted(checkpoint_names(vlm))
    assert torch.equal(saved[name], gathered[name])


def test_save_is_atomic(config, tmp_path, monkeypatch):
    import safetensors.torch

    from vlmkit.train.trainer import TRAINABLE_FILE, VLMTrainer

    vlm = PrefixConditioningVLM.build(config)
    trainer = fake_trainer(vlm, should_save=True)
    VLMTrainer._save(trainer, str(tmp_path))
    before = (tmp_path / TRAINABLE_FILE).read_bytes()

    def crash(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        VLMTrainer._save(trainer, str(tmp_path))
    assert (tmp_path / TRAINABLE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRAINABLE_FILE]


def test_fsdp_requested_where_trainer_would_not_shard_is_refused(monkeypatch):
    """On CPU, transformers' Trainer with fsdp=... runs plain multi-process training (MULTI_CPU,
    FSDP not enabled) and says nothing: vlmkit refuses instead."""
    from types import SimpleNamespace

    from vlmkit.core.errors import ConfigError
    from vlmkit.train.distributed import check_fsdp_applies

    def trainer(fsdp, enabled, plugin=None):
        return SimpleNamespace(
            args=SimpleNamespace(fsdp=fsdp),
            is_fsdp_enabled=enabled,
            accelerator=SimpleNamespace(
                distributed_type=SimpleNamespace(value="MULTI_CPU"), state=SimpleNamespace(fsdp_plugin=plugin)
            ),
        )

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_fsdp_applies(trainer([], False))
    check_fsdp_applies(trainer(["full_shard"], True))
    with pytest.raises(ConfigError, match="FSDP was requested but this run is MULTI_CPU") as exc:
        check_fsdp_applies(trainer(["full_shard"], False))
    assert "\n" not in str(exc.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    with pytest.raises(ConfigError, match="FSDP was requested"):
        check_fsdp_applies(trainer([], False))


def test_fsdp1_without_use_orig_params_is_refused(monkeypatch):
    """LoRA layers mix a frozen weight and trainable adapters in one FSDP unit: FSDP1 needs
    use_orig_params=True, which accelerate's plugin leaves False unless told."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from vlmkit.core.errors import ConfigError
    from vlmkit.train.distributed import check_fsdp_applies

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_USE_ORIG_PARAMS", raising=False)

    def trainer(plugin, model=None):
        return SimpleNamespace(
            args=SimpleNamespace(fsdp=["full_shard"]),
            is_fsdp_enabled=True,
            accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
            model=model or torch.nn.Linear(2, 2),
        )

    default = FullyShardedDataParallelPlugin(fsdp_version=1)
    assert not default.use_orig_params  # accelerate's default: the trap
    with pytest.raises(
        ConfigError, match="FSDP1 is configured with use_orig_params=False.*fsdp_use_orig_params: true"
    ) as exc:
        check_fsdp_applies(trainer(default))
    assert "\n" not in str(exc.value)
    check_fsdp_applies(trainer(FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True)))
    check_fsdp_applies(trainer(FullyShardedDataParallelPlugin(fsdp_version=2)))  # FSDP2 keeps them anyway

    # FSDP1 flattens a unit into one dtype: a bf16 base beside fp32 adapters is refused at start
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    orig = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True)
    with pytest.raises(ConfigError, match="FSDP1 flattens each unit .* bfloat16 and float32") as exc:
        check_fsdp_applies(trainer(orig, mixed))
    assert "\n" not in str(exc.value)
    check_fsdp_applies(trainer(FullyShardedDataParallelPlugin(fsdp_version=2), mixed))


def test_fsdp1_loads_the_base_in_fp32_and_fsdp2_in_the_run_precision(monkeypatch):
    """``accelerate launch`` asks for FSDP through its environment; its FSDP_VERSION defaults to 1."""
    from vlmkit.train.distributed import base_dtype, fsdp_version_requested

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert fsdp_version_requested() is None and base_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_version_requested() == 1
    assert base_dtype("bfloat16") == base_dtype("float16") == "float32"
    assert base_dtype("float32") == "float32" and base_dtype(None) is None
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert base_dtype("bfloat16") == "bfloat16"
