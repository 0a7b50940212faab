"""`ondevice-lora export peft|mlx-lm|gguf-lora` and `ondevice-lora import-adapter`
(peft, mlx-lm, gguf-lora).

The commands are registered on the main group by ondevice_lora/cli.py: `export_group` (which
holds `peft_command`, `mlx_lm_command` and `gguf_lora_command`) and `import_adapter_command`.
"""

from __future__ import annotations

import click

from ondevice_lora.errors import user_errors
from ondevice_lora.privacy.cli import with_audit

from . import EXPORTERS, IMPORTERS, export_gguf_lora, export_mlx_lm, export_peft, import_adapter

_adapter_option = click.option(
    "--adapter",
    required=True,
    help="Our adapter folder (adapter_config.json, adapters.safetensors).",
)


def _out_option(what: str):
    return click.option("--out", required=True, help=f"Where to write the {what}.")


@click.command("peft")
@_adapter_option
@_out_option("PEFT adapter folder")
@click.option(
    "--base-model-name",
    default=None,
    help="Hub id or folder of the base, recorded as base_model_name_or_path for PEFT.",
)
@user_errors
def peft_command(adapter, out, base_model_name):
    """A PEFT folder that peft.PeftModel.from_pretrained loads onto a transformers model."""
    click.echo(f"PEFT adapter: {export_peft(adapter, out, base_model_name)}")


@click.command("mlx-lm")
@_adapter_option
@_out_option("mlx-lm adapter folder")
@user_errors
def mlx_lm_command(adapter, out):
    """An mlx-lm folder for `mlx_lm.load(model, adapter_path=...)` and `--adapter-path`."""
    click.echo(f"mlx-lm adapter: {export_mlx_lm(adapter, out)}")


@click.command("gguf-lora")
@_adapter_option
@_out_option(".gguf file")
@user_errors
def gguf_lora_command(adapter, out):
    """A GGUF LoRA file for llama.cpp (`--lora`), on the base's own GGUF conversion."""
    click.echo(f"GGUF LoRA adapter: {export_gguf_lora(adapter, out)}")


class _FormatGroup(click.Group):
    """A group whose unknown subcommand is reported as an unknown format, with the known ones."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(
                f"unknown export format {name!r}; known formats: {', '.join(self.commands)}.", ctx
            )
        return super().resolve_command(ctx, args)


@click.group("export", cls=_FormatGroup)
def export_group():
    """Export an adapter for another tool (peft, mlx-lm, gguf-lora) or for iOS (coreml, adapter)."""


for _command in (peft_command, mlx_lm_command, gguf_lora_command):
    export_group.add_command(with_audit(_command))
assert set(export_group.commands) == set(EXPORTERS)  # one command per exporter


@click.command("import-adapter")
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(list(IMPORTERS)),
    help="The format of the adapter to import.",
)
@click.option(
    "--path", required=True, help="The adapter to import: a folder, or a .gguf file (gguf-lora)."
)
@click.option(
    "--model",
    default=None,
    help="The base model it goes with (folder, .gguf or Hub id); the import is checked "
    "against it and tied to it. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option("--out", required=True, help="Where to write our adapter folder.")
@user_errors
def import_adapter_command(fmt, path, model, out):
    """Import a PEFT, mlx-lm or GGUF LoRA adapter as an ondevice-lora adapter folder."""
    click.echo(f"adapter: {import_adapter(fmt, path, out, model)}")
