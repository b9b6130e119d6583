"""`promptvault serve`: the OpenAI / Anthropic compatible server (promptvault.server)."""

import json
import logging
import os
import signal
import sys

import click

from promptvault.cli.common import ByteSize, codec_options, model_option, open_vault, vault_options

log = logging.getLogger("promptvault.cli")


def _exit(signum, frame):
    raise SystemExit(0)


def context_length(lm) -> int | None:
    """The model's context from its config.json (max_position_embeddings), None when absent."""
    try:
        config = json.loads((lm.path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


@click.command("serve")
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="PROMPTVAULT_API_KEY",
              help="Require this key on /v1 routes (Authorization: Bearer KEY, or x-api-key: KEY); "
                   "$PROMPTVAULT_API_KEY keeps it out of the process list.")
@click.option("--max-tokens-cap", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests that may wait for the model; more get 503.")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=10, show_default=True,
              help="Live (uncompressed) caches of recent answers kept in memory for the next turn, as "
                   "mlx_lm.server's; 0 restores every turn from the vault.")
@click.option("--prompt-cache-bytes", type=ByteSize(), default=None,
              help="Cap on the live caches' memory, e.g. 4G [default: no cap beyond --prompt-cache-size].")
@codec_options
@vault_options
def serve_cmd(model, host, port, api_key, max_tokens_cap, max_queue, prompt_cache_size, prompt_cache_bytes, codec,
              vault_path, block_size, ram_cap, disk_cap):
    """Serve a model over HTTP (OpenAI and Anthropic APIs) with the vault as its prefix cache.

    Each request continues from the longest prefix of its prompt that the live caches of recent
    answers or the vault hold, prefills the rest, and stores the new blocks in the vault once the
    server is idle, so restarts and several server processes on one vault keep every stored
    prefix.

    Example: promptvault serve --model smollm2 --port 8080
    """
    try:
        import uvicorn

        from promptvault.server.app import create_app
        from promptvault.server.parse import Limits
        from promptvault.server.worker import Worker
    except ImportError as e:
        raise click.ClickException(f"serve needs the server extra ({e.name} is missing): "
                                   "pip install 'promptvault[server]'") from None
    from promptvault.models import load_model

    worker = Worker(lambda: load_model(model), lambda: open_vault(vault_path, block_size, ram_cap, disk_cap, codec),
                    max_queue, live_size=prompt_cache_size, live_bytes=prompt_cache_bytes)
    worker.start()
    lm = worker.lm
    names = {lm.name, "default_model", *([model] if model else ["smollm2"])}
    limits = Limits(model_names=names, context=context_length(lm), max_tokens_cap=max_tokens_cap)
    app = create_app(worker, limits, lm.name, api_key)
    click.echo(f"promptvault: serving {lm.name} on http://{host}:{port} (vault: {worker.vault.root})", err=True)
    verbose = logging.getLogger("promptvault").level <= logging.INFO
    # uvicorn re-raises the signal it shut down on; with the default handlers that would end the
    # process before the worker finishes storing the last answer. SystemExit unwinds to `finally`.
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    code = 0
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    finally:
        worker.stop()
    # Everything is stored and the vault closed. Skip interpreter teardown: MLX aborts there once
    # a second thread has run on it ("terminate called without an active exception").
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
