"""Options every verb shares, and turning them into a Vault and a model.

Options sit on each verb (`promptvault run --model X`), as in mlx-lm, rather than on the group.
"""

import dataclasses
import functools
import os
import re
from pathlib import Path

import click

from promptvault import DEFAULT_CODEC, CodecSpec, KVCodec, Vault

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def default_vault_path() -> Path:
    """$PROMPTVAULT_HOME, else ~/.cache/promptvault."""
    return Path(os.environ.get("PROMPTVAULT_HOME") or Path.home() / ".cache" / "promptvault")


class ByteSize(click.ParamType):
    """A byte count: 1048576, 512K, 300M, 2G (binary units); with allow_none also the word
    `none` (no cap), given back as ByteSize.NONE."""

    name = "size"
    NONE = "none"

    def __init__(self, allow_none: bool = False):
        self.allow_none = allow_none

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if self.allow_none and str(value).strip().lower() == self.NONE:
            return self.NONE
        match = _SIZE.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a size (examples: 500M, 2G, 1048576)", param, ctx)
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class Bits(click.ParamType):
    """Bits per coordinate: 1..8, or 'lossless'."""

    name = "bits"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "lossless":
            return "lossless"
        try:
            bits = int(value)
        except ValueError:
            self.fail(f"{value!r} is not 1..8 or 'lossless'", param, ctx)
        if not 1 <= bits <= 8:
            self.fail(f"{bits} is not in 1..8 (or 'lossless')", param, ctx)
        return bits


def vault_option(fn):
    """--vault (and the remote tier's options): for verbs that run no model, so no block size,
    caps or codec apply."""
    fn = click.option("--vault", "vault_path", type=click.Path(path_type=Path), default=None,
                      help="Vault directory [default: $PROMPTVAULT_HOME or ~/.cache/promptvault].")(fn)
    return remote_options(fn)


def vault_options(fn):
    """--vault and the settings that shape stored entries and caps (verbs that run a model)."""

    @vault_option
    @click.option("--block-size", type=click.IntRange(min=1), default=None,
                  help="Tokens per block; fixed when the vault is created [default: 256].")
    @click.option("--ram-cap", type=ByteSize(), default=None, help="RAM tier cap, e.g. 256M.")
    @click.option("--disk-cap", type=ByteSize(), default=None, help="Disk cap for the whole vault, e.g. 10G.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class CodecName(click.ParamType):
    """A codec by name (promptvault.codec.spec grammar): k4c-v3, k4cn8o25x6-v3n8-s1, lossless."""

    name = "codec"

    def convert(self, value, param, ctx):
        if isinstance(value, KVCodec):
            return value
        try:
            return KVCodec.parse(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


# --- remote tier (promptvault/vault/remote.py) ---------------------------------------------------
# --remote and --remote-endpoint ride along with the vault options of every verb without changing
# any verb's signature: they are kept in the click context, and open_vault reads them there.
_REMOTE_META = "promptvault.remote"


def remote_options(fn):
    """--remote [s3://bucket/prefix] (default $PROMPTVAULT_REMOTE) and --remote-endpoint URL.

    `--remote` without a URL uses $PROMPTVAULT_REMOTE. Giving the flag is what asks the
    maintenance verbs (ls, stats, verify, gc) to look at the remote too; run, warm and chat use
    $PROMPTVAULT_REMOTE even without it."""

    @click.option("--remote", "remote", is_flag=False, flag_value="", default=None, metavar="S3_URL",
                  help="Shared remote tier s3://bucket/prefix [default: $PROMPTVAULT_REMOTE].")
    @click.option("--remote-endpoint", default=None, metavar="URL",
                  help="S3-compatible endpoint (MinIO, R2, …) [default: $AWS_ENDPOINT_URL, else AWS].")
    @functools.wraps(fn)
    def wrapper(*args, remote=None, remote_endpoint=None, **kwargs):
        url = remote or os.environ.get("PROMPTVAULT_REMOTE") or None
        if remote is not None and not url:
            raise click.UsageError("--remote needs s3://bucket/prefix (or set PROMPTVAULT_REMOTE)")
        if url is not None and not url.startswith("s3://"):
            raise click.UsageError(f"--remote takes s3://bucket/prefix, not {url!r}")
        click.get_current_context().meta[_REMOTE_META] = (url, remote_endpoint, remote is not None)
        return fn(*args, **kwargs)

    return wrapper


def remote_asked() -> bool:
    """The command line gave --remote (the maintenance verbs then act on the remote too)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_REMOTE_META, (None, None, False))[2])


def _remote_setting():
    ctx = click.get_current_context(silent=True)
    url, endpoint, _ = ctx.meta.get(_REMOTE_META, (None, None, False)) if ctx else (None, None, False)
    return url, endpoint


def codec_options(fn):
    """--quality, --codec, or --key-bits / --value-bits, for entries this command writes or reads:
    the verb gets one `codec` argument (make_codec), None for the vault's default."""
    from promptvault.cli.quality import HELP, QUALITY

    @click.option("--quality", type=click.Choice(list(QUALITY)), default=None, help=HELP)
    @click.option("--codec", type=CodecName(), default=None,
                  help=f"Codec by name, e.g. k8c-v4 or lossless [default: {DEFAULT_CODEC}].")
    @click.option("--key-bits", type=Bits(), default=None, help="Bits per key coordinate (1..8 or lossless).")
    @click.option("--value-bits", type=Bits(), default=None, help="Bits per value coordinate (1..8 or lossless).")
    @functools.wraps(fn)
    def wrapper(*args, quality, codec, key_bits, value_bits, **kwargs):
        return fn(*args, codec=make_codec(key_bits, value_bits, quality, codec), **kwargs)

    return wrapper


def model_option(fn):
    return click.option("--model", "-m", default=None,
                        help="mlx-lm dir, Hugging Face id, .gguf file, or alias [default: SmolLM2-135M-Instruct].")(fn)


def _reject_chat(ctx, param, value):
    if value:
        raise click.UsageError("--chat is gone: the chat template is now applied by default "
                               "(--raw sends the text as is)")


def raw_option(fn):
    """--raw (alias --ignore-chat-template, as mlx-lm); the old --chat flag fails with a hint."""
    fn = click.option("--chat", is_flag=True, hidden=True, expose_value=False, callback=_reject_chat)(fn)
    return click.option("--raw", "--ignore-chat-template", "raw", is_flag=True,
                        help="Send text as is, without the model's chat template.")(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(fn)


def make_codec(key_bits, value_bits, quality=None, codec: KVCodec | None = None) -> KVCodec | None:
    """The KVCodec for --quality, --codec or --key-bits/--value-bits, or None to use the vault's default.

    A given bit width replaces the default's (keeping its centering, 8-bit norms, outlier split
    and lossless sink token); keys are centered whenever they are quantized.
    """
    given = [name for name, v in (("--quality", quality), ("--codec", codec)) if v is not None]
    if key_bits is not None or value_bits is not None:
        given.append("--key-bits/--value-bits")
    if len(given) > 1:
        raise click.UsageError(f"give one of {', '.join(given)}, not several")
    if quality is not None:
        from promptvault.cli.quality import QUALITY

        return QUALITY[quality].codec
    if codec is not None or (key_bits is None and value_bits is None):
        return codec

    def spec(bits, default: CodecSpec, center: bool) -> CodecSpec:
        if bits is None:
            return default
        if bits == "lossless":
            return CodecSpec(bits=None)
        if default.lossless:
            return CodecSpec(bits=bits, center=center)
        # Keep the default's other options (centering, 8-bit norms); its outlier split only
        # while the outlier channels still get more bits than the rest.
        if default.outliers and bits >= default.outlier_bits:
            return dataclasses.replace(default, bits=bits, outliers=0.0, outlier_bits=0)
        return dataclasses.replace(default, bits=bits)

    keys, values = spec(key_bits, DEFAULT_CODEC.keys, True), spec(value_bits, DEFAULT_CODEC.values, False)
    return KVCodec(keys=keys, values=values, sinks=0 if keys.lossless and values.lossless else DEFAULT_CODEC.sinks)


def open_vault(vault_path, block_size=None, ram_cap=None, disk_cap=None, codec=None) -> Vault:
    kwargs = {"block_size": block_size, "disk_cap": disk_cap, "codec": codec}
    url, endpoint = _remote_setting()
    if url:
        from promptvault import RemoteTier

        kwargs["remote"] = RemoteTier(url, endpoint=endpoint)
    if ram_cap is not None:
        kwargs["ram_cap"] = ram_cap
    return Vault(vault_path or default_vault_path(), **kwargs)
