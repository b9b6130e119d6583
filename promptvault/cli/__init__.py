"""The `promptvault` command: a thin click layer over the library.

Each verb lives in its own module and calls one library function; this module only assembles
the group so that `promptvault --help` lists everything.
"""

import click

from promptvault import __version__
from promptvault.cli.bench import bench


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="promptvault")
def main():
    """Compressed on-disk prompt caches for MLX / mlx-lm."""


main.add_command(bench)
