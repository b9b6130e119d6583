"""The `promptvault` executable's entry point: the CLI, or one line when MLX cannot load.

`pip install promptvault` on Linux installs MLX without a backend; importing it then fails deep
inside the first module that touches MLX with `ImportError: libmlx.so: cannot open shared object
file`. This module imports the CLI itself, so that failure becomes one line saying what to install.
"""

import sys


def main() -> None:
    try:
        from promptvault.cli import main as cli
    except ImportError as e:
        from promptvault.errors import BACKEND_HINT, missing_backend

        if not missing_backend(e):
            raise
        print(f"error: {BACKEND_HINT}", file=sys.stderr)
        sys.exit(1)
    cli()
