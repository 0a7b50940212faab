"""`ondevice-lora privacy scan | redact | epsilon | audit`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import user_errors


@click.group("privacy")
def privacy_group():
    """Find and redact personal data, account for DP, and audit memorisation."""


@privacy_group.command("scan")
@click.argument("data", type=click.Path())
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON report here (default: DATA's name + .privacy.json).")  # fmt: skip
@user_errors
def scan_command(data, report):
    """Find personal data in a dataset (file or folder) before training on it."""
    from rich.console import Console
    from rich.table import Table

    from ..atomic import write_text_atomically
    from .redact import PrivacyError, report_json, scan_dataset

    findings = scan_dataset(data)
    path = Path(report) if report else Path(str(Path(data)).rstrip("/") + ".privacy.json")
    if any(path.resolve() == file.resolve() for file in findings):
        raise PrivacyError(f"{path}: --report names a file of the dataset; choose another path.")
    table = Table(title=f"personal data in {data}")
    for column in ("file:line", "kind", "value", "certain"):
        table.add_column(column)
    for file, found in findings.items():
        for f in found:
            table.add_row(f"{file}:{f.line}", f.kind, f.value, "yes" if f.certain else "maybe")
    Console().print(table)
    result = report_json(findings)
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(result["counts"].items())) or "nothing"
    click.echo(f"found {counts} in {result['files']} file(s); report: {path}")


@privacy_group.command("redact")
@click.argument("data", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write: new or empty, outside DATA.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace --out and everything in it.")
@user_errors
def redact_command(data, out, force):
    """Write a copy of DATA with personal data replaced by placeholders ([EMAIL_1], ...)."""
    from .redact import redact_dataset

    written, redactor = redact_dataset(data, out, force)
    click.echo(f"wrote {len(written)} file(s) to {out}; {len(redactor.placeholders)} distinct "
               "values replaced (the same value has the same placeholder everywhere)")  # fmt: skip


@privacy_group.command("epsilon")
@click.option("--sample-rate", type=float, required=True, help="q: batch size / examples.")
@click.option("--noise-multiplier", type=float, required=True, help="sigma: noise std / clip.")
@click.option("--steps", type=int, required=True, help="Training steps.")
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--orders", default=None, help="RDP orders, e.g. 2-256 or 1.5,2,4 (default: "
              "1.1..10.9 by 0.1 and 11..256).")  # fmt: skip
@user_errors
def epsilon_command(sample_rate, noise_multiplier, steps, delta, orders):
    """The epsilon of DP-SGD (Poisson-sampled Gaussian) from our RDP accountant."""
    from .accountant import DEFAULT_ORDERS, dp_sgd_epsilon

    chosen = DEFAULT_ORDERS if orders is None else _orders(orders)
    eps, order = dp_sgd_epsilon(sample_rate, noise_multiplier, steps, delta, chosen)
    click.echo(f"epsilon = {eps:.6f} at delta = {delta:g} (best RDP order {order})")


def _orders(text: str) -> list[float]:
    if "-" in text and "," not in text:
        low, high = (int(x) for x in text.split("-"))
        return list(range(low, high + 1))
    return [float(x) for x in text.split(",")]


def _audit_options(command):
    from ..training.cli import _train_options

    command = click.option("--canaries", default=4, show_default=True, help="Secrets planted.")(
        command
    )
    command = click.option("--digits", default=3, show_default=True, help="Digits per secret.")(
        command
    )
    command = click.option(
        "--repeats", default=8, show_default=True, help="Copies of each secret in the data."
    )(command)
    return _train_options(command)


@privacy_group.command("audit")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@_audit_options
@user_errors
def audit_command(config_file, canaries, digits, repeats, **flags):
    """Plant random secrets in a copy of the data, train, and report each one's exposure."""
    from ..training.cli import config_from_flags
    from .audit import audit, results_table

    config = config_from_flags(config_file, flags)
    results = audit(config, canaries, digits, repeats)
    click.echo(results_table(results))


def with_audit(command):
    """Give an export command `--audit`: before exporting, rerun the adapter's training on its
    data plus canaries and refuse when a canary's exposure reaches --audit-max-exposure."""
    import functools

    callback = command.callback

    @functools.wraps(callback)
    def run(*args, audit=False, audit_max_exposure=4.0, **kwargs):
        if audit:
            adapter = kwargs.get("adapter") or (kwargs.get("adapters") or [None])[0]
            audit_adapter(adapter, audit_max_exposure)
        return callback(*args, **kwargs)

    command.callback = run
    command.params += [
        click.Option(["--audit"], is_flag=True, default=False,
                     help="Run the canary memorisation audit first (retrains on the adapter's "
                          "data with its settings; as long as its training)."),
        click.Option(["--audit-max-exposure"], type=float, default=4.0, show_default=True,
                     help="With --audit: refuse to export when a canary's exposure reaches "
                          "this many bits."),
    ]  # fmt: skip
    return command


def audit_adapter(adapter, max_exposure: float) -> None:
    """The audit of an adapter's own training run (its checkpoint holds the settings)."""
    import dataclasses
    import tempfile

    from ..errors import OndeviceLoraError
    from ..training import TrainConfig
    from ..training.checkpoint import latest_checkpoint, load_checkpoint
    from .audit import audit, results_table

    found = latest_checkpoint(adapter) if adapter else None
    if found is None:
        raise OndeviceLoraError(
            f"{adapter}: --audit needs the adapter's training settings, which its checkpoints "
            "hold, and it has none (was it trained elsewhere or its checkpoints deleted?). Run "
            "`ondevice-lora privacy audit` with the training flags instead."
        )
    state = load_checkpoint(found)[0]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in state.config.items() if k in fields}
    with tempfile.TemporaryDirectory(prefix="ondevice-lora-audit-") as tmp:
        config = TrainConfig(**{**settings, "adapter_path": str(Path(tmp) / "adapter"),
                                "resume": False})  # fmt: skip
        results = audit(config)
    click.echo(results_table(results), err=True)
    worst = max(r.exposure for r in results)
    if worst >= max_exposure:
        raise OndeviceLoraError(
            f"{adapter}: the audit found a canary exposed by {worst:.1f} bits (limit "
            f"{max_exposure}): training this way memorises rare secrets. Retrain with "
            "--dp-epsilon (e.g. 8), fewer steps, or redacted data (--redact) before shipping."
        )
    click.echo(f"audit passed: the most exposed canary has {worst:.1f} bits", err=True)
