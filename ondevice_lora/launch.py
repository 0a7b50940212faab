"""The `ondevice-lora` program's entry point: pick the fast BLAS first, then run the CLI.

On Linux the process may restart itself once with OpenBLAS preloaded (backend/fast_blas.py). Doing that
before the command line's own imports (models, converters) keeps the restart cheap; cli.main
also checks, so `python -m ondevice_lora.cli` gets the same.
"""

from __future__ import annotations

from .backend.fast_blas import reexec_with_fast_blas


def main():
    reexec_with_fast_blas()
    from .cli import main as cli

    return cli()


if __name__ == "__main__":
    main()
