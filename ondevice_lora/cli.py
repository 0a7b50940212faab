"""The `ondevice-lora` command line: generate, convert, train, eval.

Errors about user input (OndeviceLoraError) end the command with one line on stderr and exit
code 1; a traceback is kept for real bugs.
"""

from __future__ import annotations

import dataclasses

import click

from .convert import convert_command
from .errors import OndeviceLoraError
from .generate import SamplingConfig, stream_generate
from .loading import load
from .training_cli import eval_command, train_command

# The defaults shown in --help are the Python API's own, declared once in SamplingConfig.
_SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}


class _Group(click.Group):
    """A click group that reports our own errors as a message, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OndeviceLoraError as e:
            # ClickException prints "Error: <message>" to stderr and exits with code 1.
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.version_option(package_name="ondevice-lora")
def main():
    """Fine-tune LoRA adapters on a 4-bit base model with MLX, on your own machine."""


@main.command()
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option(
    "--adapter", default=None, help="Adapter folder (from `train`) to apply to the model."
)
@click.option("--prompt", required=True, help="The text to answer.")
@click.option("--greedy", is_flag=True, help="Always pick the most likely token (temperature 0).")
@click.option(
    "--temperature",
    type=float,
    default=None,
    help=f"Sampling temperature; 0 is greedy. [default: {_SAMPLING_DEFAULTS['temperature']}]",
)
@click.option(
    "--top-p",
    type=float,
    default=_SAMPLING_DEFAULTS["top_p"],
    show_default=True,
    help="Sample only from the most likely tokens holding this much probability.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=_SAMPLING_DEFAULTS["max_tokens"],
    show_default=True,
    help="The most tokens to generate.",
)
@click.option("--seed", type=int, default=None, help="Make sampling reproducible.")
@click.option("--system", default=None, help="System prompt (needs a chat template).")
@click.option(
    "--no-chat",
    is_flag=True,
    help="Send the prompt as plain text, without the model's chat template.",
)
def generate(
    model_name, adapter, prompt, greedy, temperature, top_p, max_tokens, seed, system, no_chat
):
    """Generate a reply to --prompt, printing it as it is produced."""
    if greedy and temperature not in (None, 0):
        raise click.UsageError("--greedy and --temperature contradict each other; pass one.")
    if temperature is None:
        temperature = _SAMPLING_DEFAULTS["temperature"]
    config = SamplingConfig(
        temperature=0.0 if greedy else temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
    )
    model, tokenizer = load(model_name, adapter=adapter)
    stream = stream_generate(model, tokenizer, prompt, config, chat=not no_chat, system=system)
    for piece in stream:
        click.echo(piece, nl=False)
    click.echo()
    click.echo(stream.stats.summary(), err=True)


main.add_command(convert_command)
main.add_command(train_command)
main.add_command(eval_command)


if __name__ == "__main__":
    main()
