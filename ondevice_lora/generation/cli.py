"""`ondevice-lora generate`: one reply to a prompt, printed as it is produced."""

from __future__ import annotations

import dataclasses

import click

from ..adapters.mix import load_adapters, names_for
from ..loading import load
from .generate import SamplingConfig, stream_generate

# The defaults shown in --help are the Python API's own, declared once in SamplingConfig.
_SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}


@click.command("generate")
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Adapter folder (from `train`) to apply to the model; repeat it to combine several.",
)
@click.option(
    "--adapter-weight",
    "adapter_weights",
    type=float,
    multiple=True,
    help="Weight of each --adapter, in the same order [default: 1 each].",
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
def generate_command(
    model_name,
    adapters,
    adapter_weights,
    prompt,
    greedy,
    temperature,
    top_p,
    max_tokens,
    seed,
    system,
    no_chat,
):
    """Generate a reply to --prompt, printing it as it is produced."""
    if greedy and temperature not in (None, 0):
        raise click.UsageError("--greedy and --temperature contradict each other; pass one.")
    if adapter_weights and len(adapter_weights) != len(adapters):
        raise click.UsageError(
            f"{len(adapter_weights)} --adapter-weight for {len(adapters)} --adapter; "
            "give one weight per adapter, in the same order."
        )
    for flag, text in (("--prompt", prompt), ("--system", system)):
        if text is not None and not _is_text(text):
            # The shell passed bytes that are not UTF-8 (Python keeps them as lone surrogates).
            raise click.UsageError(
                f"{flag} is not UTF-8 text; set a UTF-8 locale (e.g. LANG=C.UTF-8) or re-type it."
            )
    if temperature is None:
        temperature = _SAMPLING_DEFAULTS["temperature"]
    config = SamplingConfig(
        temperature=0.0 if greedy else temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
    )
    if len(adapters) == 1 and not adapter_weights:
        model, tokenizer = load(model_name, adapter=adapters[0])
    else:
        model, tokenizer = load(model_name)
        if adapters:
            # Several adapters (or a weighted one) share the base: their weighted sum is active.
            names = names_for(adapters)
            weights = adapter_weights or [1.0] * len(adapters)
            load_adapters(model, dict(zip(names, adapters)), tokenizer, dict(zip(names, weights)))
    stream = stream_generate(model, tokenizer, prompt, config, chat=not no_chat, system=system)
    for piece in stream:
        click.echo(piece, nl=False)
    click.echo()
    click.echo(stream.stats.summary(), err=True)


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
