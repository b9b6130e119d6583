"""`promptvault doctor [--json]`: print the machine report from promptvault.doctor."""

import json

import click


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json):
    """Check MLX, the device, CPU matmul speed (BLAS) and the model cache."""
    from promptvault.doctor import run_doctor

    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    cache = report["model_cache"]
    lines = [
        f"promptvault {report['promptvault']}  python {report['python']}  {report['platform']}",
        f"mlx {report['mlx']}  mlx-lm {report['mlx_lm']}  default device {report['default_device']}",
        f"fp32 matmul: {report['matmul_fp32_gflops']} GFLOP/s  (OpenBLAS loaded: {report['openblas_loaded']})",
        f"model cache: {cache['path']}  {_human_bytes(cache['bytes'])}",
        *(f"model {name}: {state}" for name, state in report["test_models"].items()),
        *(f"hint: {hint}" for hint in report["hints"]),
    ]
    click.echo("\n".join(lines))
