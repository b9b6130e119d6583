"""`promptvault bench …`: benchmarks that print a table, or JSON rows with --json."""

import json

import click


@click.group()
def bench():
    """Measure the codec and the vault (tables; --json for machine-readable rows)."""


@bench.command("codec")
@click.option("--bits", "bits_list", default="2,3,4", show_default=True, help="Comma-separated bit widths.")
@click.option("--dims", default="64,80,96,128,192,256,72", show_default=True, help="Comma-separated head dims.")
@click.option("--tokens", default=4096, show_default=True, help="Vectors per (data set, head dim).")
@click.option("--seed", default=0, show_default=True)
@click.option("--model", default=None, help="Model whose real K/V are measured too (default: the default model).")
@click.option("--real/--no-real", default=True, show_default=True, help="Include the model's real keys and values.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
def codec_cmd(bits_list, dims, tokens, seed, model, real, as_json):
    """TurboQuant vs MLX affine (mx.quantize, group 64): size, error, speed."""
    from promptvault.bench.codec import format_table, run_codec_bench

    try:
        bits = [int(b) for b in bits_list.split(",")]
        dim_list = [int(d) for d in dims.split(",")]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers")
    rows = run_codec_bench(bits=bits, dims=dim_list, tokens=tokens, seed=seed, real_model=model, real=real)
    click.echo(json.dumps(rows, indent=1) if as_json else format_table(rows))
