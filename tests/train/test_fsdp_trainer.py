"""``VLMTrainer``'s checkpoints under FSDP, with real shards (2 gloo CPU processes) and accelerate's
own FSDP plugin and optimizer saving: on CPU ``Trainer`` never shards, so its checkpoint methods
are driven here on a trainer built without ``__init__``, as ``Trainer._save_checkpoint`` calls them.

- Under accelerate's FSDP2 default, ``SHARDED_STATE_DICT``, ``Trainer.save_model`` never called
  ``_save``: no ``trainable.safetensors``, so no resume and no early stopping. Now every state-dict
  type writes it.
- The trainable tensors are gathered alone, never through ``Trainer``'s whole-model state dict
  (``accelerator.get_state_dict``), and checkpoints hold no copy of the frozen base
  (``save_fsdp_model``): the optimizer's state (trainable parameters only) and the schedule,
  beside the trainable tensors, whatever ``fsdp_state_dict_type`` says.
- Resuming loads them into a freshly wrapped model's shards and optimizer.
- ``--eval-metrics`` (``caption_metrics``) keeps every rank generating until all are done
  (``synced_gpus``) when ranks' captions end at different steps: a sharded block needs every rank.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_sharded import tiny_sharded_config

from vlmkit.core.model import PrefixConditioningVLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["A red circle on the left.", "A blue square on the right."]
#: accelerate's defaults: FSDP2 under accelerate launch saves sharded state dicts, FSDP1 full ones
CASES = {
    "fsdp2": (2, "SHARDED_STATE_DICT"),
    "fsdp2-full": (2, "FULL_STATE_DICT"),
    "fsdp1": (1, "FULL_STATE_DICT"),
}


def wrap(vlm, version: int):
    if version == 2:
        from vlmkit.train.distributed import shard_model

        return shard_model(vlm)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(m) for m in vlm.modules() if type(m).__name__ in vlm._no_split_modules}
    return FullyShardedDataParallel(
        vlm, auto_wrap_policy=ModuleWrapPolicy(blocks), use_orig_params=True, device_id=torch.device("cpu")
    )


def trainer_for(model, version: int, state_dict_type: str, rank: int, out: str):
    """A ``VLMTrainer`` as ``Trainer.__init__`` and ``accelerator.prepare`` leave it under FSDP."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel

    from vlmkit.train.trainer import VLMTrainer

    def whole_model(_model):
        raise AssertionError("Trainer's whole-model state dict was gathered")

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=state_dict_type)
    trainer = VLMTrainer.__new__(VLMTrainer)
    trainer.model = trainer.model_wrapped = model
    trainer.is_fsdp_enabled = True
    trainer.placement = None
    trainer.args = SimpleNamespace(should_save=rank == 0, output_dir=out)
    trainer.accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        process_index=rank,
        unwrap_model=lambda m: m.module if isinstance(m, FullyShardedDataParallel) else m,
        get_state_dict=whole_model,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    trainer.lr_scheduler = torch.optim.lr_scheduler.ConstantLR(trainer.optimizer, factor=1.0)
    return trainer


def eval_metrics(trainer, rank: int) -> dict:
    """``--eval-metrics`` through ``VLMTrainer.caption_metrics``, rank 0's captions ending at their
    first token and rank 1's running 8 steps, with nothing marking the LM as FSDP-managed (today
    torch marks the modules FSDP manages, for Dynamo; vlmkit no longer relies on that)."""
    from vlmkit.sdk.datasets import load_split
    from vlmkit.train.config import DatasetConfig
    from vlmkit.train.distributed import vlm_of

    for module in trainer.model.modules():
        module.__dict__.pop("_is_fsdp_managed_module", None)
    spec = vlm_of(trainer.model).decoder_spec
    if rank == 0:
        spec.stop_token_ids = lambda tokenizer, style="auto": list(range(len(tokenizer)))
    data = load_split([DatasetConfig(name="shapes", options={"size": 72, "image_size": 32})], "validation")
    trainer.eval_captions = (data, None)
    trainer.vlm_config = SimpleNamespace(max_eval_samples=4)
    trainer.args.per_device_eval_batch_size = 2
    try:
        return trainer.caption_metrics()
    finally:
        spec.__dict__.pop("stop_token_ids", None)


def rank_main(rank: int, world: int, config: dict, root: str) -> None:
    import shutil
    import sys
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    from vlmkit.testing import sample_images
    from vlmkit.train.distributed import optimizer_state, trainable_state_dict

    torch.set_num_threads(1)
    which = shutil.which  # no Java scorers: the pure-Python tokenizer, no METEOR
    shutil.which = lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    warnings.simplefilter("ignore")
    sys.stderr = open(f"{root}/rank-{rank}.log", "w")  # noqa: SIM115 - the process's own stderr
    # a rank left waiting (generation out of step) fails in a minute, not in half an hour
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's logging, which its FSDP saving uses, needs one
    report = {}
    for case, (version, state_dict_type) in CASES.items():
        out = f"{root}/{case}/checkpoint-1"
        torch.manual_seed(0)
        vlm = PrefixConditioningVLM.build(config, seed=0)
        pixels = vlm.preprocess(sample_images(2))
        buffers = sum(1 for layer in vlm.unfrozen_encoder_layers() for _ in layer.buffers())
        trainer = trainer_for(wrap(vlm, version), version, state_dict_type, rank, out)
        loss = trainer.model(**vlm.tokenize(CAPTIONS).to_dict(), pixel_values=pixels)["loss"]
        loss.backward()
        trainer.optimizer.step()
        trainer.save_model(out, _internal_call=True)  # as Trainer._save_checkpoint calls them
        trainer._save_optimizer_and_scheduler(out)
        want = trainable_state_dict(trainer._gather_target())

        # resumed into another initialisation, freshly wrapped
        torch.manual_seed(1)
        fresh = PrefixConditioningVLM.build(config, seed=1)
        resumed = trainer_for(wrap(fresh, version), version, state_dict_type, rank, out)
        resumed._load_trainable(out)
        resumed._load_optimizer_and_scheduler(out)
        got = trainable_state_dict(resumed._gather_target())
        momentum = [
            optimizer_state(t.model, t.optimizer).get("state", {}) for t in (trainer, resumed)
        ]  # rank 0 only
        report[case] = {
            "metrics": eval_metrics(resumed, rank),
            "resumed": all(torch.equal(got[k], want[k]) for k in want),
            "names": sorted(want),
            "momentum": rank > 0
            or (
                len(momentum[0]) == len(want) - buffers
                and all(
                    torch.equal(momentum[0][k]["momentum_buffer"], momentum[1][k]["momentum_buffer"])
                    for k in momentum[0]
                )
            ),
        }
        dist.barrier()
    with open(f"{root}/report-{rank}.json", "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(torchrun, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-trainer")
    config = tiny_sharded_config(root)
    codes = torchrun.join(torchrun.fork(rank_main, config, str(root)), timeout=240)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(root.glob("rank-*.log")))
    assert codes == [0, 0], logs
    reports = [json.loads((root / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    return root, config, reports


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_checkpoints_hold_the_trainable_tensors_and_no_frozen_base(checkpoints, case):
    from vlmkit.train.distributed import checkpoint_names

    root, config, reports = checkpoints
    folder = root / case / "checkpoint-1"
    saved = load_file(str(folder / "trainable.safetensors"))  # under SHARDED_STATE_DICT too
    reference = PrefixConditioningVLM.build(config, seed=0)
    assert sorted(saved) == sorted(checkpoint_names(reference)) == reports[0][case]["names"]
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    assert all(saved[n].shape == shapes[n] for n in saved if n in shapes)  # full tensors, not shards
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.pt",
        "scheduler.pt",
        "trainable.safetensors",
    ]
    # no model beside them (Trainer's save_fsdp_model wrote pytorch_model_fsdp*), and an optimizer
    # file of the trainable parameters' state (FSDP1's was as large as its flat parameters)
    frozen = sum(p.numel() * p.element_size() for p in reference.parameters() if not p.requires_grad)
    written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert written < frozen
    assert all(report[case]["resumed"] and report[case]["momentum"] for report in reports)


@pytest.mark.parametrize("case", list(CASES))
def test_eval_metrics_under_fsdp_keep_ranks_in_step_when_their_captions_end_apart(checkpoints, case):
    _, _, reports = checkpoints
    assert reports[0][case]["metrics"] == reports[1][case]["metrics"]  # every rank got rank 0's scores
    assert "CIDEr" in reports[0][case]["metrics"]
