"""FSDP with a 16-bit frozen base (2 gloo CPU processes, bf16 tensors), as ``accelerate launch``
wraps a model: FSDP1 with one unit per decoder block and a mixed-precision policy, FSDP2 with
``fully_shard`` per block then the root.

- FSDP1 (accelerate's default version) cannot wrap a bf16 base beside fp32 LoRA and projection
  weights ("Must flatten tensors with uniform dtype"): under FSDP1 vlmkit loads the base in fp32
  (``base_dtype``) and FSDP computes in bf16, and a training step runs.
- Checkpoints gather only what they hold: under FSDP1 one unit at a time, never the whole model.
- FSDP2 shards each parameter alone: the bf16 base beside fp32 adapters trains as built.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_sharded import tiny_sharded_config

from vlmkit.core.model import PrefixConditioningVLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["A red circle on the left.", "A blue square on the right."]


def fsdp1(vlm):
    """FSDP1 as accelerate wraps it under bf16: a unit per decoder block, the root, bf16 compute."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(m) for m in vlm.modules() if type(m).__name__ in vlm._no_split_modules}
    half = MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16
    )
    return FullyShardedDataParallel(
        vlm,
        auto_wrap_policy=ModuleWrapPolicy(blocks),
        use_orig_params=True,
        mixed_precision=half,
        device_id=torch.device("cpu"),
    )


def step(model, vlm, pixels) -> float:
    """One SGD step under bf16 autocast, as Trainer runs it."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = vlm.tokenize(CAPTIONS).to_dict()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, pixel_values=pixels)["loss"]
    loss.backward()
    optimizer.step()
    return loss.item()


def rank_main(rank: int, world: int, config: dict, root: str) -> None:
    import contextlib
    import sys
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from vlmkit.testing import sample_images
    from vlmkit.train.distributed import base_dtype, load_trainable, shard_model, trainable_state_dict

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sys.stderr = open(f"{root}/rank-{rank}.log", "w")  # noqa: SIM115 - the process's own stderr
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    report: dict = {}

    # what vlmkit loaded before: the base in bf16 beside fp32 LoRA and projection weights
    try:
        fsdp1(PrefixConditioningVLM.build(config, seed=0, dtype="bfloat16"))
        report["bf16_base"] = "wrapped"
    except ValueError as exc:
        report["bf16_base"] = str(exc)

    # accelerate launch with FSDP (version 1, its default) and bf16: what vlmkit loads now
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1")
    report["base_dtype"] = base_dtype("bfloat16")
    vlm = PrefixConditioningVLM.build(config, seed=0, dtype=report["base_dtype"])
    total = sum(p.numel() for p in vlm.parameters())
    shapes = {n: list(p.shape) for n, p in vlm.named_parameters()}  # FSDP1 flattens them in place
    pixels = vlm.preprocess(sample_images(2))
    model = fsdp1(vlm)
    report["fsdp1_loss"] = step(model, vlm, pixels)

    # checkpoints: how much is full at once while the trainable tensors are gathered and loaded
    summon, calls = FullyShardedDataParallel.summon_full_params, []

    @contextlib.contextmanager
    def counting(module, recurse=True, **kwargs):
        with summon(module, recurse=recurse, **kwargs):
            nested = any(isinstance(m, FullyShardedDataParallel) for m in module.modules() if m is not module)
            calls.append({"nested": recurse and nested, "full": sum(p.numel() for p in model.parameters())})
            yield

    FullyShardedDataParallel.summon_full_params = staticmethod(counting)
    try:
        tensors = trainable_state_dict(model)
        load_trainable(model, {k: v + 1 for k, v in tensors.items()})
        again = trainable_state_dict(model)
    finally:
        FullyShardedDataParallel.summon_full_params = summon
    report["summons"], report["total"] = calls, total
    report["loaded"] = all(torch.equal(again[k], tensors[k] + 1) for k in tensors)
    report["trainable"] = {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()}
    report["full_shapes"] = all(list(v.shape) == shapes[k] for k, v in tensors.items())

    # FSDP2 keeps the bf16 base as built
    os.environ.update(FSDP_VERSION="2")
    report["fsdp2_base_dtype"] = base_dtype("bfloat16")
    vlm = PrefixConditioningVLM.build(config, seed=0, dtype=report["fsdp2_base_dtype"])
    report["fsdp2_loss"] = step(shard_model(vlm), vlm, pixels)

    with open(f"{root}/report-{rank}.json", "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(torchrun, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-half")
    config = tiny_sharded_config(root)
    codes = torchrun.join(torchrun.fork(rank_main, config, str(root)), timeout=240)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(root.glob("rank-*.log")))
    assert codes == [0, 0], logs
    return [json.loads((root / f"report-{rank}.json").read_text()) for rank in (0, 1)]


def test_fsdp1_cannot_flatten_a_bf16_base_beside_fp32_adapters_so_the_base_loads_in_fp32(reports):
    for report in reports:
        assert "uniform dtype" in report["bf16_base"]  # what vlmkit train hit in accelerator.prepare
        assert report["base_dtype"] == "float32"
        assert torch.isfinite(torch.tensor(report["fsdp1_loss"]))  # a bf16 step under FSDP1
        assert all(dtype == "torch.float32" for _, dtype in report["trainable"].values())


def test_fsdp1_checkpoints_gather_one_unit_at_a_time_not_the_whole_model(reports):
    for report in reports:
        assert report["summons"] and not any(call["nested"] for call in report["summons"])
        assert max(call["full"] for call in report["summons"]) < report["total"]
        assert report["loaded"] and report["full_shapes"]  # full tensors out, back into the shards


def test_fsdp2_trains_a_bf16_base_beside_fp32_adapters(reports):
    for report in reports:
        assert report["fsdp2_base_dtype"] == "bfloat16"
        assert torch.isfinite(torch.tensor(report["fsdp2_loss"]))
