"""`ondevice-lora export coreml`: export a model (and adapter) to Core ML, then prove the package.

coremltools and the exporter are imported inside the command, so that `ondevice-lora --help`
and the other commands do not pay for them.
"""

from __future__ import annotations

import click

# A fixed, plain English prompt for validation: long enough (with a chat template around it) to
# fill more than one prefill chunk, so chunking and padding are exercised too.
VALIDATION_TEXT = (
    "Write two short sentences about why small language models are useful on phones, "
    "mentioning privacy, battery life and working without a network connection."
)
DECODE_STEPS = 8


@click.command("coreml")
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option("--adapter", default=None, help="Adapter folder (from `train`) to include.")
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(),
    help="The package to write, ending in .mlpackage; tokenizer files go beside it.",
)
@click.option(
    "--precision",
    type=click.Choice(["int4", "fp16", "fp32"]),
    default="int4",
    show_default=True,
    help="int4 keeps a quantised base's own 4- or 8-bit codes; dense layers become 4-bit.",
)
@click.option(
    "--context",
    "context_length",
    type=click.IntRange(min=2),
    default=512,
    show_default=True,
    help="The KV cache's length: the most tokens a conversation can hold.",
)
@click.option(
    "--prefill-length",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens per prefill call; prompts are fed in chunks of this size.",
)
@click.option(
    "--no-validate",
    is_flag=True,
    help="Skip the check of the saved package against MLX (not recommended).",
)
def coreml_command(
    model_name, adapter, out_path, precision, context_length, prefill_length, no_validate
):
    """Export to a stateful Core ML package (prefill + decode) and validate it against MLX."""
    from ondevice_lora.adapters import read_adapter_config
    from ondevice_lora.fingerprint import base_fingerprint
    from ondevice_lora.loading import load

    from .export import export_coreml
    from .weights import quantize_for_int4

    model, tokenizer = load(model_name, adapter=adapter)
    # The base's identity before any quantisation for export: the one adapters are checked on.
    fingerprint = base_fingerprint(model, tokenizer)
    adapter_config = None
    if adapter is not None:
        adapter_config = read_adapter_config(adapter)[0].to_dict()
    if precision == "int4":
        # Quantise the MLX model itself, as the export would: the package then reuses these
        # exact codes, and this model is the reference the package must match.
        count = quantize_for_int4(model)
        if count:
            click.echo(f"quantised {count} unquantised layers to 4 bits (groups of 32) for int4")
    result = export_coreml(
        model,
        tokenizer,
        out_path,
        precision=precision,
        context_length=context_length,
        adapter_config=adapter_config,
        fingerprint=fingerprint,
        prefill_length=prefill_length,
    )
    click.echo(result.summary())
    click.echo(f"package size: {result.package_bytes} bytes; weights: {result.weight_bytes} bytes")
    if no_validate:
        click.echo("validation skipped (--no-validate)")
        return
    from .validate import validate_package

    prompt_ids = _validation_prompt(tokenizer, context_length - DECODE_STEPS)
    report = validate_package(result.path, model, prompt_ids, decode_steps=DECODE_STEPS)
    click.echo(report.summary())


def _validation_prompt(tokenizer, max_tokens: int) -> list[int]:
    """The validation text, in the model's chat template when it has one, cut to fit."""
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": VALIDATION_TEXT}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
    else:
        ids = tokenizer.encode(VALIDATION_TEXT)
    return ids[:max_tokens]
