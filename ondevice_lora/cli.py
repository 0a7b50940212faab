"""The `ondevice-lora` command line: the root group; each feature registers its own commands.

Errors about user input (OndeviceLoraError) end the command with one line on stderr and exit
code 1; a traceback is kept for real bugs.
"""

from __future__ import annotations

import click

from .backend.fast_blas import reexec_with_fast_blas
from .errors import OndeviceLoraError


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
    """Fine-tune LoRA adapters on a 4-bit base model with MLX, on your own machine.

    \b
    On Linux, MLX computes on the CPU with a slow bundled BLAS. When OpenBLAS is
    installed (apt-get install libopenblas0-pthread), ondevice-lora restarts itself
    once with it preloaded (LD_PRELOAD), which makes CPU training many times faster.
    ONDEVICE_LORA_FAST_BLAS=0 turns this off; ONDEVICE_LORA_BLAS=/path/lib.so picks
    the library.
    """


def _register_commands() -> None:
    # Export commands live with the converters; their heavy imports (coremltools, gguf) happen
    # inside the commands, so registering them keeps `ondevice-lora --help` fast.
    from converters.coreml.cli import adapter_command, coreml_command
    from converters.formats.cli import export_group, import_adapter_command

    from .adapters.fuse import fuse_command
    from .generation.chat_cli import chat_command
    from .generation.cli import generate_command
    from .loading.convert import convert_command
    from .privacy.cli import privacy_group, with_audit
    from .quickstart import quickstart_command
    from .serve.cli import serve_command
    from .training.cli import eval_command, train_command

    export_group.add_command(with_audit(coreml_command))
    export_group.add_command(adapter_command)
    for command in (
        generate_command,
        convert_command,
        train_command,
        eval_command,
        fuse_command,
        export_group,
        import_adapter_command,
        quickstart_command,
        chat_command,
        serve_command,
        privacy_group,
    ):
        main.add_command(command)


_register_commands()


if __name__ == "__main__":
    # As the console script (launch.py) does: on Linux, restart once with OpenBLAS preloaded.
    reexec_with_fast_blas()
    main()
