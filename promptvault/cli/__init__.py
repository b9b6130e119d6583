"""The `promptvault` command: a thin click layer over the library.

Each verb lives in its own module and calls library functions; this module assembles the group
and turns every expected failure into one line on stderr with a non-zero exit status:
PromptvaultError and OS errors (missing files, full disk, permissions) exit 1, usage errors
(bad flags or values) exit 2.
"""

import logging
import sqlite3
import sys

import click

from promptvault import __version__
from promptvault.cli.bench import bench
from promptvault.cli.chat import chat_cmd
from promptvault.cli.doctor import doctor
from promptvault.cli.maintenance import COMMANDS as MAINTENANCE_COMMANDS
from promptvault.cli.remote import COMMANDS as REMOTE_COMMANDS
from promptvault.cli.run import run_cmd
from promptvault.cli.serve import serve_cmd
from promptvault.cli.warm import warm_cmd
from promptvault.errors import PromptvaultError


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class OneLineErrorGroup(click.Group):
    """A click group whose errors are one line (`error: …`) instead of usage dumps or tracebacks."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "promptvault"
            click.echo(f"error: {_one_line(e.format_message())} (see: {command} --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code or 1)
        except PromptvaultError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(1)
        except sqlite3.DatabaseError as e:  # the index went bad (or full) while in use
            click.echo(f"error: vault index: {_one_line(e)} (files are intact; `promptvault reindex` "
                       "rebuilds the index from them)", err=True)
            sys.exit(1)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"error: {_one_line(e.strerror or e)}{where}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="promptvault")
@click.option("-v", "--verbose", count=True, help="Log what the vault does (-v), and per block (-vv).")
def main(verbose):
    """Compressed on-disk prompt caches for MLX / mlx-lm.

    Warm a document once (`promptvault warm FILE`); later runs about it restore its cache
    instead of prefilling (`promptvault run --context FILE -p QUESTION`, `promptvault chat`).
    """
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("promptvault: %(message)s"))
    logger = logging.getLogger("promptvault")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


for command in (warm_cmd, run_cmd, chat_cmd, serve_cmd, *MAINTENANCE_COMMANDS, *REMOTE_COMMANDS, doctor, bench):
    main.add_command(command)
