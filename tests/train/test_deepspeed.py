"""DeepSpeed ZeRO-2 and ZeRO-3 with 2 gloo CPU processes (``DS_ACCELERATOR=cpu``): train through
the DeepSpeed engine, take the trainable tensors from the state dict DeepSpeed gathers (what
``Trainer`` hands ``VLMTrainer._save``), resume into a fresh ZeRO-3 engine's partitions, and write
the final artifact from every rank (gathered, written by rank 0). The artifact loads in one process
and computes what the same training without DeepSpeed computes.

And ``vlmkit train`` itself under ZeRO-3, configured as ``accelerate launch`` configures it
(``ACCELERATE_USE_DEEPSPEED`` and friends, without ``stage3_gather_16bit_weights_on_model_save``:
vlmkit gathers only the trainable tensors) and launched with torchrun: its checkpoints leave the
frozen base out, and a run stopped at step 4 and resumed to 6 ends where an uninterrupted run does.

DeepSpeed is an optional extra of vlmkit (``.[deepspeed]``, which ``make test`` installs); without it
installed, these tests are skipped (reason shown). On GPUs (NCCL, bf16): not tested here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_sharded import assert_artifact_matches, tiny_sharded_config

import vlmkit
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images
from vlmkit.train.distributed import checkpoint_names, trainable_state_dict

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed: pip install -e '.[deepspeed]' (make test does)",
    ),
]

TIMEOUT_S = 240  # the first DeepSpeed run on a machine builds its CPU communication op
STEPS = 3
CAPTIONS = ["A red circle on the left.", "A blue square on the right."]


def train_plain(vlm, pixels):
    """The DeepSpeed runs' training in one process: SGD with momentum on one batch."""
    batch = vlm.tokenize(CAPTIONS)
    optimizer = torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.3, momentum=0.9)
    for _ in range(STEPS):
        vlm.train()
        loss = vlm(**batch.to_dict(), pixel_values=pixels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.eval()


WORKER = f"""
import json, sys, warnings
import torch, torch.distributed as dist
import deepspeed
from safetensors.torch import save_file
from vlmkit.core.model import PrefixConditioningVLM
from vlmkit.testing import sample_images
from vlmkit.train.distributed import is_sharded, load_trainable, save_model, trainable_state_dict

warnings.simplefilter("ignore")
config, root = json.loads(sys.argv[1]), sys.argv[2]
CAPTIONS, STEPS = {CAPTIONS!r}, {STEPS}
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
torch.set_num_threads(1)


def engine_for(vlm, stage):
    ds_config = {{
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {{
            "stage": stage,
            "stage3_param_persistence_threshold": 0,  # partition even the tiny model's parameters
            "stage3_gather_16bit_weights_on_model_save": True,
        }},
        "optimizer": {{"type": "SGD", "params": {{"lr": 0.3, "momentum": 0.9}}}},
        "zero_allow_untested_optimizer": True,
    }}
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    return deepspeed.initialize(model=vlm, model_parameters=trainable, config=ds_config)[0]


for stage in (2, 3):
    out = f"{{root}}/zero{{stage}}"
    torch.manual_seed(0)  # build(seed=) seeds the projection; LoRA draws from the global RNG
    vlm = PrefixConditioningVLM.build(config, seed=0)
    pixels = vlm.preprocess(sample_images(2))
    batch = vlm.tokenize(CAPTIONS).to_dict()
    engine = engine_for(vlm, stage)
    assert is_sharded(vlm) == (stage == 3)
    for _ in range(STEPS):
        loss = engine(**batch, pixel_values=pixels)["loss"]
        engine.backward(loss)
        engine.step()
    engine.eval()
    # what Trainer passes VLMTrainer._save under DeepSpeed: the state dict DeepSpeed gathers
    gathered = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else vlm.state_dict()
    if rank == 0:
        save_file(trainable_state_dict(vlm, gathered), out + "-trainable.safetensors")
    counted = []  # what vlmkit's own gathering gathers: the trainable tensors, not the whole model

    class Counting(deepspeed.zero.GatheredParameters):
        def __init__(self, params, *args, **kwargs):
            counted.append(sum(p.ds_numel for p in params))
            super().__init__(params, *args, **kwargs)

    original, deepspeed.zero.GatheredParameters = deepspeed.zero.GatheredParameters, Counting
    tensors = trainable_state_dict(vlm)  # gathered by vlmkit itself (every rank)
    deepspeed.zero.GatheredParameters = original
    if rank == 0:
        with open(out + "-gathered.json", "w") as fh:
            json.dump({{"gathered": sum(counted), "checkpoint": sum(t.numel() for t in tensors.values())}}, fh)
    if stage == 3:  # resume: another initialisation, partitioned, then the tensors loaded into it
        torch.manual_seed(1)
        vlm = PrefixConditioningVLM.build(config, seed=1)
        engine_for(vlm, stage)
        load_trainable(vlm, tensors)
    save_model(vlm, out)  # every rank: gathered, written by rank 0
    dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    return tiny_sharded_config(root)


@pytest.fixture(scope="module")
def trained(torchrun, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    (out / "worker.py").write_text(WORKER)
    run = torchrun(
        out / "worker.py", json.dumps(config), out, env={"DS_ACCELERATOR": "cpu"}, timeout=TIMEOUT_S
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resume_and_artifact_match_one_process(config, trained, stage):
    torch.manual_seed(0)  # as in the workers
    reference = PrefixConditioningVLM.build(config, seed=0)
    pixels = reference.preprocess(sample_images(2))
    train_plain(reference, pixels)
    want = trainable_state_dict(reference)

    saved = load_file(str(trained / f"zero{stage}-trainable.safetensors"))
    assert sorted(saved) == sorted(checkpoint_names(reference))  # trainable tensors only, full
    for name, value in want.items():
        assert value.shape == saved[name].shape, name
        assert torch.allclose(value, saved[name], atol=1e-5), name

    assert_artifact_matches(trained / f"zero{stage}", reference, want, pixels, CAPTIONS)
    if stage == 3:  # only the partitions of the trainable tensors were gathered, never the whole model
        counts = json.loads((trained / "zero3-gathered.json").read_text())
        assert (
            0
            < counts["gathered"]
            <= counts["checkpoint"]
            < sum(p.numel() for p in reference.parameters()) / 4
        )


# ------------------------------------------------------------------------ vlmkit train under ZeRO-3


def zero3_train(torchrun, config, root, out, steps: int, *extra: str):
    """``vlmkit train`` under DeepSpeed ZeRO-3 as ``accelerate launch`` configures it (its
    environment variables), 2 gloo CPU processes; a constant learning rate, so that 4 steps then
    2 more follow the schedule of 6."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        # vlmkit gathers the trainable tensors itself: no 16-bit copy of the whole model is needed
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
        "VLMKIT_HOME": str(root / "home"),
    }
    args = [
        "-m", "vlmkit.cli.main", "train",
        "--encoder", "siglip", "--encoder-checkpoint", config["encoder_checkpoint"],
        "--decoder", "smollm", "--decoder-checkpoint", config["decoder_checkpoint"],
        "--dataset", "shapes:size=72,image_size=32", "--batch-size", "4", "--max-steps", str(steps),
        "--set", "save_every=2", "--set", "scheduler=constant_with_warmup", "--set", "warmup_ratio=0",
        "--output", str(out), "--quiet", *extra,
    ]  # fmt: skip
    run = torchrun(*args, env=env, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_vlmkit_train_under_zero3_checkpoints_without_the_base_and_resumes_like_one_run(
    torchrun, config, tmp_path
):
    zero3_train(torchrun, config, tmp_path, tmp_path / "whole", 6)
    # the run as it stood at step 4 (the learning rate is constant: steps 1-4 of a 6-step run are a
    # 4-step run): its checkpoints up to step 4, no later one and no model yet ...
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-6")
    for written_at_the_end in ("vlmkit.json", "projection.safetensors", "adapter"):
        target = part / written_at_the_end
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    zero3_train(torchrun, config, tmp_path, part, 6, "--resume")  # ... resumed

    # DeepSpeed's own checkpoint holds the optimizer's partitions, not the frozen base
    base = PrefixConditioningVLM.build(
        {k: config[k] for k in ("encoder", "encoder_checkpoint", "decoder", "decoder_checkpoint")}
    )
    frozen_bytes = sum(p.numel() * p.element_size() for p in base.parameters() if not p.requires_grad)
    states = list((tmp_path / "part" / "checkpoints" / "checkpoint-4").glob("global_step4/*model_states.pt"))
    assert len(states) == 2
    assert sum(f.stat().st_size for f in states) < frozen_bytes / 4

    whole, resumed = vlmkit.load(tmp_path / "whole"), vlmkit.load(tmp_path / "part")
    assert json.loads((tmp_path / "part" / "vlmkit.json").read_text())["training"]["global_step"] == 6
    at_4 = load_file(str(tmp_path / "part" / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))
    assert at_4 and all(not n.startswith("encoder.") for n in at_4)  # projection and LoRA: all trained
    want, got = whole.state_dict(), resumed.state_dict()  # loaded models are frozen: by name
    for name in at_4:
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    assert any(not torch.allclose(at_4[name], want[name]) for name in at_4)  # the 2 resumed steps trained
