"""FSDP2 (``fully_shard``) with 2 gloo CPU processes: train, checkpoint the gathered trainable
tensors, resume into a freshly sharded model, generate under sharding, save the artifact; the
artifact loads in one process and captions like the same training without sharding.

Both ranks see the same batch, so the averaged gradient is the one-process gradient and the
sharded run must match the unsharded one up to float rounding.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images, tiny_decoder_checkpoint, tiny_encoder_checkpoint
from vlmkit.train.distributed import checkpoint_names, load_trainable, trainable_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT_S = 180
STEPS = 3
CAPTIONS = ["A red circle on the left.", "A blue square on the right."]


def train(vlm, pixels):
    """A few SGD steps on one batch: the same in the sharded workers and in this process."""
    batch = vlm.tokenize(CAPTIONS)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)  # Adam would blow float noise on ~0 gradients up to lr
    for _ in range(STEPS):
        vlm.train()
        loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.eval()


WORKER = (
    textwrap.dedent(
        """
    import json, sys
    import torch, torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from vlmkit.core.model import PrefixConditioningVLM
    from vlmkit.testing import sample_images
    from vlmkit.train.distributed import (
        is_sharded, load_trainable, save_model, shard_model, trainable_state_dict, unsharded_root,
    )

    config, out = json.loads(sys.argv[1]), sys.argv[2]
    CAPTIONS, STEPS = json.loads(sys.argv[3]), int(sys.argv[4])
    """
    )
    + inspect.getsource(train)
    + textwrap.dedent(
        """
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # build(seed=) seeds the projection; LoRA draws from the global RNG
    vlm = shard_model(PrefixConditioningVLM.build(config, seed=0))
    assert is_sharded(vlm)
    pixels = vlm.preprocess(sample_images(2))
    train(vlm, pixels)
    tensors = trainable_state_dict(vlm)  # gathered on every rank
    if rank == 0:
        save_file(tensors, out + "/trainable.safetensors")
    dist.barrier()

    # resume: another initialisation, sharded, then the checkpoint distributed into its shards
    resumed = shard_model(PrefixConditioningVLM.build(config, seed=1))
    load_trainable(resumed, load_file(out + "/trainable.safetensors"))
    mine = pixels[rank : rank + 1]  # each rank captions its own image: they may stop at different steps
    with unsharded_root(resumed):
        ids = resumed.generate(pixel_values=mine, return_ids=True, max_new_tokens=8)
    save_model(resumed, out + "/model")  # every rank: gathered, written by rank 0
    dist.barrier()
    json.dump(ids, open(f"{out}/ids-{rank}.json", "w"))
    dist.destroy_process_group()
    """
    )
)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "encoder": "siglip",
        "encoder_checkpoint": tiny_encoder_checkpoint("siglip", root / "siglip", image_size=32),
        "decoder": "smollm",
        "decoder_checkpoint": tiny_decoder_checkpoint("llama", root / "llama"),
        "projection": {"type": "mlp", "reduction": "avgpool", "tokens": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "unfreeze_encoder_layers": 1,
        "max_caption_tokens": 8,
    }


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


def test_fsdp2_trains_checkpoints_resumes_generates_and_saves_like_one_process(config, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(worker), json.dumps(config), str(tmp_path), json.dumps(CAPTIONS), str(STEPS),
    ]  # fmt: skip
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # a rank waiting for ever, most likely
        pytest.fail(f"FSDP run did not finish in {TIMEOUT_S} s:\n{(exc.stderr or b'')[-4000:]!r}")
    assert run.returncode == 0, run.stderr[-4000:]

    torch.manual_seed(0)  # as in the workers
    reference = PrefixConditioningVLM.build(config, seed=0)
    pixels = reference.preprocess(sample_images(2))
    train(reference, pixels)
    want = trainable_state_dict(reference)
    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert sorted(saved) == sorted(checkpoint_names(reference))
    assert any(name.startswith("encoder.") for name in saved)  # the unfrozen encoder block too
    for name, value in want.items():
        assert value.shape == saved[name].shape, name  # full tensors, not shards
        assert torch.allclose(value, saved[name], atol=1e-5), name

    loaded = vlmkit.load(tmp_path / "model")
    for name, value in trainable_state_dict(loaded).items():
        assert torch.allclose(value, want[name], atol=1e-5), name
    batch = reference.tokenize(CAPTIONS).to_dict()
    with torch.no_grad():
        logits = reference(**batch, pixel_values=pixels, return_logits=True)["logits"]
        assert torch.allclose(
            loaded(**batch, pixel_values=pixels, return_logits=True)["logits"], logits, atol=1e-4
        )
    reference_ids = reference.generate(pixel_values=pixels, return_ids=True, max_new_tokens=8)
    assert loaded.generate(pixel_values=pixels, return_ids=True, max_new_tokens=8) == reference_ids
    for rank in (0, 1):  # generated under sharding, one image per rank
        assert json.loads((tmp_path / f"ids-{rank}.json").read_text()) == reference_ids[rank : rank + 1]


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

    def trainer(fsdp, enabled):
        return SimpleNamespace(
            args=SimpleNamespace(fsdp=fsdp),
            is_fsdp_enabled=enabled,
            accelerator=SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU")),
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
