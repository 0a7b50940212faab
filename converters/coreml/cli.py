"""`ondevice-lora export coreml` and `ondevice-lora export adapter`: Core ML packages and the
adapter files of swappable ones, each export checked against MLX and its sizes reported.

coremltools and the exporters are imported inside the commands, so that `ondevice-lora --help`
and the other commands do not pay for them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ondevice_lora.errors import user_errors

# A fixed, plain English prompt for validation: long enough (with a chat template around it) to
# fill more than one prefill chunk, so chunking and padding are exercised too.
VALIDATION_TEXT = (
    "Write two short sentences about why small language models are useful on phones, "
    "mentioning privacy, battery life and working without a network connection."
)
DECODE_STEPS = 8
MODES = ("merged", "multifunction", "swappable")
# Adapter pairs per multifunction package, beside the base pair: 2 + 2 = 4 functions. Projects
# running LLMs on the Neural Engine report packages that fail to compile or load on device past
# about four functions; more adapters go into further packages (README: "Multifunction").
MAX_ADAPTERS_PER_PACKAGE = 1


class _ListOptionsCommand(click.Command):
    """Lets `--adapters A1 A2 A3` take every value up to the next option: click options take a
    fixed number of values, so each one is rewritten as `--adapters A1 --adapters A2 ...`."""

    list_options = ("--adapters",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten, current = [], None
        for arg in args:
            if arg in self.list_options:
                current = arg
            elif arg.startswith("-"):
                current = None
                rewritten.append(arg)
            elif current is not None:
                rewritten += [current, arg]
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@click.command("coreml", cls=_ListOptionsCommand)
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model folder, .gguf file or Hub id. Default: the built-in SmolLM2-135M-Instruct.",
)
@click.option("--adapter", default=None, help="One adapter folder (from `train`) to include.")
@click.option(
    "--adapters",
    multiple=True,
    help="Adapter folders: --adapters A1 A2 ... (a multifunction or swappable export).",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="merged: one package, at most one adapter. multifunction: prefill_<name>/decode_<name> "
    "per adapter plus prefill_base/decode_base. swappable: LoRA matrices as inputs, and one "
    ".coreml-adapter.safetensors per adapter. [default: merged for one adapter or none, "
    "multifunction for several]",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(),
    help="The package to write, ending in .mlpackage; its tokenizer files go into the folder "
    "<name>-tokenizer beside it.",
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
    "--r-max",
    type=click.IntRange(min=1),
    default=None,
    help="Swappable: the largest adapter rank the package takes. [default: the adapters' "
    "largest rank, else 16]",
)
@click.option(
    "--targets",
    default=None,
    help="Swappable: comma-separated projections with LoRA inputs (q_proj,...,down_proj or "
    "all-linear). [default: every target of the adapters, else q_proj,v_proj]",
)
@click.option(
    "--no-validate",
    is_flag=True,
    help="Skip the check of the saved package against MLX (not recommended).",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    default=None,
    help="A UTF-8 text file of your own kind of input: int4/fp16 exports measure the model's "
    "activations on it (besides built-in text) to keep them inside fp16's range.",
)
@click.option(
    "--keep-failed",
    is_flag=True,
    help="Keep a package that fails its validation at <out>.failed (default: remove it).",
)
@click.option(
    "--max-adapters-per-package",
    type=click.IntRange(min=1),
    default=MAX_ADAPTERS_PER_PACKAGE,
    show_default=True,
    help="Multifunction: adapter pairs per package, beside the base pair; more adapters go "
    "into <out>-2.mlpackage, ... (see README).",
)
@user_errors
def coreml_command(model_name, adapter, adapters, mode, out_path, no_validate, **settings):
    """Export to a stateful Core ML package (prefill + decode) and validate it against MLX."""
    from ondevice_lora.adapters.fingerprint import base_fingerprint
    from ondevice_lora.loading import load

    from .weights import quantize_for_int4

    adapters = ([adapter] if adapter else []) + list(adapters)
    mode = mode or ("multifunction" if len(adapters) > 1 else "merged")
    if mode == "merged" and len(adapters) > 1:
        raise click.UsageError(
            f"--mode merged takes one adapter, got {len(adapters)}; use --mode multifunction "
            "or swappable to put several beside one base."
        )
    if mode == "multifunction" and not adapters:
        click.echo("no adapters given: the package holds prefill_base/decode_base only")
    swappable_only = [f"--{k.replace('_', '-')}" for k in ("r_max", "targets") if settings[k]]
    if mode != "swappable" and swappable_only:
        raise click.UsageError(f"{' and '.join(swappable_only)} only apply to --mode swappable.")

    if settings["targets"]:
        from .swappable import check_targets

        check_targets(settings["targets"])  # before the model loads: a typo fails at once
    merged = mode == "merged" and adapters
    model, tokenizer = load(model_name, adapter=adapters[0] if merged else None)
    # The base's identity before any quantisation for export: the one adapters are checked on.
    fingerprint = base_fingerprint(model, tokenizer)
    if settings["precision"] == "int4":
        # Quantise the MLX model itself, as the export would: the package then reuses these
        # exact codes, and this model is the reference the package must match.
        count = quantize_for_int4(model)
        if count:
            click.echo(f"quantised {count} unquantised layers to 4 bits (groups of 32) for int4")
    export = {"merged": _merged, "multifunction": _multifunction, "swappable": _swappable}[mode]
    package = {k: settings[k] for k in ("precision", "context_length", "prefill_length")}
    package |= _placement(settings, no_validate)
    if mode == "multifunction":
        package["max_adapters_per_package"] = settings["max_adapters_per_package"]
    elif settings["max_adapters_per_package"] != MAX_ADAPTERS_PER_PACKAGE:
        raise click.UsageError("--max-adapters-per-package only applies to --mode multifunction.")
    prompt_ids = _validation_prompt(tokenizer, settings["context_length"] - DECODE_STEPS)
    checks = None if no_validate else (prompt_ids, DECODE_STEPS)
    reports = export(model, tokenizer, adapters, out_path, fingerprint, package, checks, settings)
    for name, report in reports.items():
        click.echo(f"[{name}] {report.summary()}")
    if no_validate:
        click.echo("validation skipped (--no-validate)")


def _placement(settings: dict, no_validate: bool) -> dict:
    """The fp16 fit and failure handling every export takes from the options."""
    from .fp16_range import Fp16Fit, read_calibration_file

    texts = [VALIDATION_TEXT]
    if settings["calibration"]:
        texts.append(read_calibration_file(settings["calibration"]))
    if no_validate and settings["keep_failed"]:
        raise click.UsageError(
            "--keep-failed keeps a package that fails validation; "
            "it does nothing with --no-validate."
        )
    return {"fit": Fp16Fit(calibration_texts=tuple(texts)), "keep_failed": settings["keep_failed"]}


def _echo_fit(result) -> None:
    if result.fit is not None:
        click.echo(f"fp16 range: {result.fit.summary()}")


def _merged(model, tokenizer, adapters, out_path, fingerprint, package, checks, settings):
    from ondevice_lora.adapters.files import read_adapter_config
    from ondevice_lora.adapters.layers import adapter_modules

    from .export import export_coreml
    from .size_report import SizeReport, weight_file_bytes
    from .validate import validate_package

    config = read_adapter_config(adapters[0])[0].to_dict() if adapters else None
    check = None
    if checks is not None:
        check = lambda path: {"package": validate_package(path, model, *checks)}  # noqa: E731
    result = export_coreml(
        model,
        tokenizer,
        out_path,
        adapter_config=config,
        fingerprint=fingerprint,
        check=check,
        **package,
    )
    _echo_fit(result)
    # An int4 export keeps the adapter as a branch (fp16 A and B); fp16/fp32 merge it away.
    branch = sum(
        m.lora_a.size + m.lora_b.size + (m.magnitude.size if "magnitude" in m else 0)
        for m in adapter_modules(model).values()
    )
    adapter_bytes = 2 * branch if result.adapter_mode == "unmerged" else 0
    names = [Path(adapters[0]).name] if adapters else []
    sizes = SizeReport(
        kind="merged",
        package=result.path,
        base_weight_bytes=result.weight_bytes - adapter_bytes,
        package_bytes=result.package_bytes,
        weight_file_bytes=weight_file_bytes(result.path),
        function_pairs=1,
        adapter_bytes=dict.fromkeys(names, adapter_bytes),
        adapter_tensor_bytes=dict.fromkeys(names, adapter_bytes),
    )
    click.echo(result.summary())
    click.echo(f"package size: {result.package_bytes} bytes; weights: {result.weight_bytes} bytes")
    click.echo(sizes.render())
    return result.validation or {}


def _multifunction(model, tokenizer, adapters, out_path, fingerprint, package, checks, settings):
    from .multifunction import export_multifunction, named_adapters, validate_multifunction
    from .placement import tokenizer_folder

    limit = package.pop("max_adapters_per_package")
    named = list(named_adapters(adapters).items())
    groups = [dict(named[i : i + limit]) for i in range(0, len(named), limit)] or [{}]
    paths = [Path(out_path)] + [
        Path(out_path).with_name(f"{Path(out_path).stem}-{i}.mlpackage")
        for i in range(2, len(groups) + 1)
    ]
    if len(groups) > 1:
        click.echo(
            f"{len(named)} adapters, at most {limit} per package (--max-adapters-per-package): "
            f"{len(groups)} packages, {', '.join(p.name for p in paths)}; all use the tokenizer "
            f"folder {tokenizer_folder(paths[0]).name}"
        )
    reports = {}
    for index, (group, path) in enumerate(zip(groups, paths)):
        check = None
        if checks is not None:
            check = lambda p, g=group: validate_multifunction(p, model, g, *checks)  # noqa: E731
        result = export_multifunction(
            model,
            tokenizer if index == 0 else None,  # the first package's tokenizer folder serves all
            group,
            path,
            fingerprint=fingerprint,
            check=check,
            **package,
        )
        if index == 0:
            _echo_fit(result)
        click.echo(result.summary())
        for name, (prefill, decode) in result.functions.items():
            source = result.adapters.get(name, "the plain base")
            click.echo(f"  {prefill} / {decode}: {source}")
        click.echo(result.sizes.render())
        prefix = "" if len(groups) == 1 else f"{path.name}: "
        reports |= {prefix + name: r for name, r in (result.validation or {}).items()}
    return reports


def _swappable(model, tokenizer, adapters, out_path, fingerprint, package, checks, settings):
    from ondevice_lora.adapters.files import read_adapter_config

    from .adapter_file import adapter_inputs, validate_swappable, write_adapter_files
    from .swappable import SwappableLayout, base_inputs, export_swappable
    from .validate import validate_package

    configs = [read_adapter_config(folder)[0] for folder in adapters]
    targets = settings["targets"]
    if targets is None:
        targets = ["q_proj", "v_proj"] if not configs else []
        for config in configs:
            found = config.target_modules
            targets += [found] if isinstance(found, str) else found
    r_max = settings["r_max"] or max((c.rank for c in configs), default=16)
    # Every adapter must fit before the (long) package build starts.
    layout = SwappableLayout.from_architecture(dataclasses.asdict(model.args), targets, r_max)
    for folder in adapters:
        adapter_inputs(folder, layout, fingerprint)
    check = None
    if checks is not None:
        # Before it is put in place: the base, all adapter inputs zero. The adapter files are
        # written from the placed package, and checked after.
        zero = base_inputs(layout)
        check = lambda path: validate_package(path, model, *checks, extra_inputs=zero)  # noqa: E731
    result = export_swappable(
        model,
        tokenizer,
        out_path,
        layout.targets,
        layout.r_max,
        fingerprint=fingerprint,
        check=check,
        **package,
    )
    _echo_fit(result)
    files = write_adapter_files(result, adapters, fingerprint)
    click.echo(result.summary())
    click.echo(f"  LoRA inputs for {', '.join(layout.targets)} up to rank {layout.r_max}")
    for name, path in files.items():
        click.echo(f"  adapter file {name}: {path}")
    click.echo(result.sizes.render())
    if checks is None:
        return {}
    pairs = {name: (folder, files[name]) for name, folder in zip(files, adapters)}
    return validate_swappable(result.path, model, pairs, *checks)


@click.command("adapter")
@click.option("--adapter", required=True, help="The adapter folder (from `train`).")
@click.option(
    "--package",
    default=None,
    type=click.Path(exists=True),
    help="The swappable .mlpackage the file is for: its inputs give the layout, and the "
    "adapter is checked against its base.",
)
@click.option(
    "--r-max",
    type=click.IntRange(min=1),
    default=None,
    help="Without --package: the package's r_max. [default: the adapter's rank]",
)
@click.option(
    "--targets",
    default=None,
    help="Without --package: the package's comma-separated targets. [default: the adapter's]",
)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(),
    help="The file to write, ending in .coreml-adapter.safetensors. [default: "
    "<adapter name>.coreml-adapter.safetensors beside the package, or here]",
)
@user_errors
def adapter_command(adapter, package, r_max, targets, out_path):
    """Write an adapter as one file a swappable Core ML package takes as inputs."""
    from ondevice_lora.adapters.files import read_adapter_config

    from .adapter_file import file_name, write_adapter_file
    from .export import CoreMLExportError
    from .swappable import SwappableLayout, read_swappable_package

    config, base = read_adapter_config(adapter)
    if package is not None:
        if r_max or targets:
            raise click.UsageError(
                "--r-max and --targets come from --package; give one or the other."
            )
        layout, fingerprint = read_swappable_package(package)
    else:
        if not base or "architecture" not in base:
            raise CoreMLExportError(
                f"{adapter}: its config does not record the base's architecture; give --package."
            )
        layout = SwappableLayout.from_architecture(
            base["architecture"], targets or config.target_modules, r_max or config.rank
        )
        fingerprint = None
    if out_path is None:
        out_path = (Path(package).parent if package else Path.cwd()) / file_name(adapter)
    path = write_adapter_file(adapter, out_path, layout, fingerprint)
    size = path.stat().st_size
    click.echo(f"adapter file: {path}")
    click.echo(
        f"  {size:,} bytes ({size / 2**20:.2f} MiB): rank {config.rank} padded to r_max "
        f"{layout.r_max}, {layout.num_layers} layers, targets {', '.join(layout.targets)}"
    )
    if package is not None:
        click.echo("  checked against the package's inputs and base fingerprint")
    else:
        click.echo("  not checked against a package (give --package to check it)")


def _validation_prompt(tokenizer, max_tokens: int) -> list[int]:
    """The validation text, in the model's chat template when it has one, cut to fit."""
    from ondevice_lora.generation.generate import encode_prompt

    return encode_prompt(tokenizer, VALIDATION_TEXT)[:max_tokens]
