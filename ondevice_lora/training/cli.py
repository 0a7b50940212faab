"""`ondevice-lora train` and `ondevice-lora eval`.

`train` has one flag per TrainConfig field, generated from the dataclass (so a new field is a
new flag), plus `--config file.yaml`. Defaults, then the file, then the flags fill the one
TrainConfig. Registered on the main group by cli.py as `train_command` and `eval_command`;
`python -m ondevice_lora.training.cli` runs them on their own.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import click
import yaml

from ..errors import user_errors
from .config import TrainConfig
from .evaluate import EvalConfig

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, list):
        value = ",".join(value)
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _option(f: dataclasses.Field):
    """A click option for one TrainConfig field; unset flags stay None (the file decides)."""
    help_text = f"{f.metadata.get('help', '')} [default: {_default_text(f)}]"
    kind = str(f.type)
    if kind == "bool":
        flag = _flag(f.name)
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    if kind.startswith("float"):
        type_ = click.FLOAT
    elif kind.startswith("int"):
        type_ = click.INT
    else:
        type_ = click.STRING
    return click.option(_flag(f.name), f.name, type=type_, default=None, help=help_text)


def _train_options(command):
    # click applies decorators bottom-up; reversed keeps --help in the dataclass's order.
    for f in reversed(list(_FIELDS.values())):
        command = _option(f)(command)
    return command


def config_from_flags(config_file, flags: dict) -> TrainConfig:
    """The TrainConfig of a `train` command line: defaults, then the YAML file, then flags."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    if (
        isinstance(overrides.get("target_modules"), str)
        and overrides["target_modules"] != "all-linear"
    ):
        overrides["target_modules"] = [t.strip() for t in overrides["target_modules"].split(",") if t.strip()]  # fmt: skip
    flag_names = {k: _flag(k) for k in overrides}
    if config_file is not None:
        return TrainConfig.from_yaml(config_file, overrides, flag_names)
    return TrainConfig.from_sources({}, {}, overrides, flag_names)


@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file of settings (the keys are the flag names with underscores); flags win.",
)
@_train_options
@user_errors
def train_command(config_file, **flags):
    """Train a LoRA adapter on your data, offline; resumable with --resume.

    With --workers N, N processes on this machine each train on 1/N of every batch (MLX's ring
    backend on 127.0.0.1); with --hostfile, the machines it lists do (through mlx.launch).
    """
    from . import distributed
    from .api import train_from_config

    config = config_from_flags(config_file, flags)
    if not distributed.launched() and (config.workers > 1 or config.hostfile):
        config.validate()
        _train_distributed(config)
        return
    rank = int(os.environ.get("MLX_RANK", "0")) if distributed.launched() else 0
    result = train_from_config(config, show_progress=rank == 0)
    if rank != 0:
        return
    click.echo(f"adapter: {result.adapter_path}")
    click.echo(f"steps: {result.steps}, trained tokens: {result.trained_tokens}")
    if result.losses:
        click.echo(f"final training loss: {result.losses[-1]:.4f}")
    if result.best_val_loss is not None:
        click.echo(f"best validation loss: {result.best_val_loss:.4f} (step {result.best_step})")
    if result.stopped_early:
        click.echo("stopped early: the validation loss stopped improving")
    click.echo(f"metrics: {result.metrics_path}")
    if result.plot_path is not None:
        click.echo(f"loss curve: {result.plot_path}")


def _train_distributed(config: TrainConfig) -> None:
    """Start the ranks of a distributed run and wait for them (rank 0 prints the results)."""
    from . import distributed

    if config.hostfile:
        # Every machine reads the same command line; paths must exist on each of them.
        distributed.run_hostfile(sys.argv[1:], config.hostfile)
        return
    # Local ranks get the settings as one file, so they train on exactly this TrainConfig.
    with tempfile.TemporaryDirectory(prefix="ondevice-lora-train-") as folder:
        settings = Path(folder) / "train.yaml"
        data = {k: str(v) if isinstance(v, Path) else v for k, v in config.to_dict().items()}
        settings.write_text(yaml.safe_dump(data))
        click.echo(f"training with {config.workers} workers on 127.0.0.1", err=True)
        distributed.run_local_workers(
            ["train", "--config", str(settings)], config.workers, config.adapter_path
        )


_EVAL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig)}


@click.command("eval")
@click.option("--model", default=None, help="Base model folder, .gguf or cached Hub id.")
@click.option("--adapter", "adapter_path", default=None, help="Adapter folder (omit: base only).")
@click.option("--data", required=True, help="A .jsonl file, notes, or a folder with test.jsonl.")
@click.option("--batch-size", type=int, default=_EVAL_DEFAULTS["batch_size"], show_default=True)
@click.option("--max-length", type=int, default=_EVAL_DEFAULTS["max_length"], show_default=True)
@click.option(
    "--num-batches",
    type=int,
    default=_EVAL_DEFAULTS["num_batches"],
    show_default=True,
    help="Batches to evaluate (-1: all).",
)
@click.option(
    "--loss-on",
    default=_EVAL_DEFAULTS["loss_on"],
    show_default=True,
    help="assistant, last_assistant or all.",
)
@click.option(
    "--offline-guard/--no-offline-guard",
    default=True,
    show_default=True,
    help="Refuse network connections, name lookups and new processes while evaluating.",
)
@user_errors
def eval_command(**options):
    """Loss and perplexity on a test set, with and without the adapter."""
    from .evaluate import evaluate_from_config

    result = evaluate_from_config(EvalConfig(**options))
    click.echo(result.summary())


@click.group()
def _standalone():
    """train and eval, for `python -m ondevice_lora.training.cli`."""


_standalone.add_command(train_command)
_standalone.add_command(eval_command)

if __name__ == "__main__":
    _standalone()
