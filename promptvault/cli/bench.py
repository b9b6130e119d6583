"""`promptvault bench …`: benchmarks that print a table, or JSON rows with --json."""

import json

import click

BLOCKS_PER_PROMPT = 10  # promptvault.bench.index.BLOCKS (not imported: the CLI loads benches lazily)


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


@bench.command("speed")
@click.option("--model", default="smollm2", show_default=True,
              help="Model alias/path/GGUF, or random:llama3-8b / random:qwen3-8b (random weights, bf16).")
@click.option("--lengths", default=None,
              help="Comma-separated prefix lengths (default: 512,2048,8192 on CPU; 4096,16384,32768 on GPU).")
@click.option("--seed", default=0, show_default=True)
@click.option("--workdir", default=None, help="Directory for the temporary vault and mlx-lm files.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--profile", is_flag=True, help="Also print where the disk restore's time goes.")
@click.option("--remote", is_flag=False, flag_value="", default=None, metavar="S3_URL",
              help="Instead: restore from a remote tier vs disk vs cold (no URL: moto's S3 server on 127.0.0.1).")
@click.option("--remote-endpoint", default=None, metavar="URL", help="S3-compatible endpoint for --remote S3_URL.")
def speed_cmd(model, lengths, seed, workdir, as_json, profile, remote, remote_endpoint):
    """Cold prefill vs warm vs restore (RAM, disk) vs mlx-lm's save/load_prompt_cache.

    --remote: cold prefill vs restore from a shared remote tier vs from the local disk."""
    import mlx.core as mx

    from promptvault.bench.speed import format_table as speed_table, run_speed_bench

    if lengths is None:
        lengths = "4096,16384,32768" if mx.default_device() == mx.gpu else "512,2048,8192"
    try:
        lens = [int(n) for n in lengths.split(",")]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers")
    if any(n < 1 for n in lens):
        raise click.BadParameter("prefix lengths must be positive")
    if remote is not None:  # remote tier (promptvault/bench/remote_speed.py)
        from promptvault.bench.remote_speed import format_table as remote_table, run_remote_bench

        result = run_remote_bench(model, lens, remote or None, remote_endpoint, seed=seed, workdir=workdir)
        click.echo(json.dumps(result, indent=1) if as_json else remote_table(result))
        return
    result = run_speed_bench(model, lens, seed=seed, workdir=workdir)
    click.echo(json.dumps(result, indent=1) if as_json else speed_table(result, profile=profile))


@bench.command("fidelity")
@click.option("--model", "models", multiple=True, default=("smollm2",), show_default=True,
              help="Model alias/path/GGUF; repeat for several (one table each, one plot panel each).")
@click.option("--settings", default=None,
              help="Comma-separated settings, e.g. lossless,affine4,k4c-v3,k5cn8-v3n8-s4-b512 "
                   "[default: the bits grid, affine 4/8 and the key-fidelity sweep].")
@click.option("--greedy", default="lossless,affine4,affine8,k4c-v3,k4c-v4,k5cn8-v3n8-s4", show_default=True,
              help="Settings that also get a 64-token greedy continuation ('all', 'none', or a list).")
@click.option("--prompts", "limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--prefix-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prefix length P; the next 65 tokens are the true continuation.")
@click.option("--cache-dir", type=click.Path(), default=None,
              help="Where lossless prefills are kept between runs [default: $TMPDIR/promptvault-fidelity].")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="Write the ratio-vs-KL plot (PNG) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def fidelity_cmd(models, settings, greedy, limit, prefix_tokens, cache_dir, plot_path, as_json):
    """Teacher-forced KL, top-1, perplexity, greedy identity and per-layer cosines of restored
    prompt caches vs lossless, with bytes on disk, over the fixed prompt set."""
    import tempfile
    from pathlib import Path

    from promptvault.bench.fidelity import DEFAULT_SETTINGS, format_table as fid_table, parse_setting, pareto
    from promptvault.bench.fidelity import plot, run_fidelity
    from promptvault.models import load_model

    names = DEFAULT_SETTINGS if settings is None else [s.strip() for s in settings.split(",") if s.strip()]
    try:
        for name in names:
            parse_setting(name)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--settings")
    if plot_path:
        try:
            import matplotlib  # noqa: F401  (checked before the long run, not after it)
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'promptvault[bench]'")
    greedy_names = names if greedy == "all" else [] if greedy == "none" else [g.strip() for g in greedy.split(",")]
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "promptvault-fidelity"
    results = []
    for model in models:
        lm = load_model(model)
        log = None if as_json else (lambda m: click.echo(m, err=True))
        results.append(run_fidelity(lm, names, limit=limit, prefix=prefix_tokens, greedy_settings=greedy_names,
                                    cache_dir=cache, log=log))
    if plot_path:
        plot(results, Path(plot_path))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items()} for r in results], indent=1))
        return
    for r in results:
        click.echo(f"\n{r['model']}: {r['prompts']} prompts, prefix {r['prefix']} tokens, "
                   f"{r['continuation']} continuation tokens")
        click.echo(fid_table(r))
        click.echo("Pareto front (ratio vs KL): " + ", ".join(pareto([x for x in r["rows"] if x["kl"] > 0])))


@bench.command("index")
@click.option("--chunks", type=click.IntRange(min=BLOCKS_PER_PROMPT), default=1_000_000, show_default=True,
              help="Fill the index up to this many chunks (also measured at 10K and 100K below it).")
@click.option("--workdir", default=None, help="Directory for the temporary index.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def index_cmd(chunks, workdir, as_json):
    """Lookup (stored, diverging inside a block, new, exact tail leaf), stats and a capped write's
    disk accounting, on an index of P prompts x 10 blocks filled to 10K / 100K / 1M chunks.

    Example: promptvault bench index --chunks 100000
    """
    from promptvault.bench.index import format_table as index_table, run_index_bench

    result = run_index_bench(chunks, workdir=workdir)
    click.echo(json.dumps(result, indent=1) if as_json else index_table(result))


@bench.command("kernels")
@click.option("--check", "check_", is_flag=True, help="GPU: every kernel case against the pure-MLX reference.")
@click.option("--bench", "bench_", is_flag=True, help="GPU: encode/decode GB/s, reference and fused, next to a copy.")
@click.option("--restore", is_flag=True, help="GPU: restore_cache through the kernels vs the reference.")
@click.option("--sweep", "sweep_", is_flag=True, help="GPU: decode GB/s under the plan kernel's tuning knobs.")
@click.option("--cpu", "cpu", is_flag=True,
              help="The pure-MLX codec on the CPU: default K/V specs, per head dim, one layer and stacked layers.")
@click.option("--dims", default="64,96,128,256", show_default=True, help="Head dims for --check.")
@click.option("--bits", default="1,2,3,4", show_default=True, help="Bit widths for --check.")
@click.option("--dtypes", default="float16,bfloat16", show_default=True, help="Dtypes for --check.")
@click.option("--cpu-dims", default="64,128,256", show_default=True, help="Head dims for --cpu.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (progress rows still stream).")
def kernels_cmd(check_, bench_, restore, sweep_, cpu, dims, bits, dtypes, cpu_dims, out, as_json):
    """Fused GPU kernels vs the pure-MLX reference (correctness, GB/s), and the pure-MLX codec's
    GB/s on the CPU. With no option: --check --bench on a GPU, --cpu elsewhere. Exit 1 when a
    check fails.

    Example: promptvault bench kernels --check --bench --restore --cpu --out kb.json
    """
    import time

    import mlx.core as mx

    from promptvault.codec import kernels

    try:
        dim_list = [int(d) for d in dims.split(",")]
        bit_list = [int(b) for b in bits.split(",")]
        cpu_dim_list = [int(d) for d in cpu_dims.split(",")]
        dtype_list = [getattr(mx, t.strip()) for t in dtypes.split(",")]
    except (ValueError, AttributeError):
        raise click.BadParameter("expected comma-separated integers (dims, bits) and MLX dtype names")
    if not (check_ or bench_ or restore or sweep_ or cpu):
        if kernels.backend() == "reference":
            cpu = True
        else:
            check_ = bench_ = True
    result = {"device": str(mx.default_device()), "backend": kernels.backend(), "mlx": mx.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    failed = False
    if check_ or bench_ or restore or sweep_:
        from promptvault.bench.kernels import NoKernels, run

        try:
            gpu, failed = run(check_, bench_, restore, sweep_, dim_list, bit_list, dtype_list)
        except NoKernels as err:
            raise click.ClickException(str(err))
        result.update(gpu)
    if cpu:
        from promptvault.bench.kernels_cpu import cpu_table, format_cpu_table, machine_load

        load = machine_load()
        result["cpu"] = {"load_average": load, "rows": cpu_table(dims=cpu_dim_list)}
        failed |= not all(r["stacked_bit_identical"] for r in result["cpu"]["rows"])
        if not as_json:
            click.echo(format_cpu_table(result["cpu"]["rows"], load))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if as_json:
        click.echo(json.dumps(result, indent=1, default=str))
    if failed:
        raise SystemExit(1)


@bench.command("serve")
@click.option("--model", default=None, help="Model alias/path/GGUF [default: SmolLM2-135M-Instruct].")
@click.option("--conversations", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--turns", type=click.IntRange(min=2), default=3, show_default=True,
              help="Turns per conversation; every server restarts after half of them.")
@click.option("--system-tokens", type=click.IntRange(min=16), default=1500, show_default=True,
              help="Size of the shared system prompt (instructions + tool schemas).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True, help="New tokens per answer.")
@click.option("--tool-lines", type=click.IntRange(min=0), default=16, show_default=True,
              help="Lines of each tool result (a file listing, ~25 tokens a line) from turn 2 on.")
@click.option("--setups", default="promptvault,mlx_lm.server,promptvault x2", show_default=True,
              help="Comma-separated: promptvault, mlx_lm.server, 'promptvault x2' (two servers, one vault).")
@click.option("--workdir", default=None, help="Directory for the temporary vaults and logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def serve_bench_cmd(model, conversations, turns, system_tokens, max_tokens, tool_lines, setups, workdir, as_json):
    """Replay an agent-like trace (shared system prompt, several turns, restart midway) against
    `promptvault serve` and `mlx_lm.server`: TTFT p50/p95, cached-token share, time.

    Example: promptvault bench serve --conversations 3 --turns 3
    """
    from promptvault.bench.serve import SETUPS, format_table as serve_table, run_serve_bench

    chosen = [s.strip() for s in setups.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETUPS]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown setup(s) {unknown}; choose from {', '.join(SETUPS)}", param_hint="--setups")
    log = None if as_json else (lambda m: click.echo(m, err=True))
    result = run_serve_bench(model, conversations=conversations, turns=turns, system_tokens=system_tokens,
                             max_tokens=max_tokens, setups=chosen, tool_lines=tool_lines, workdir=workdir, log=log)
    click.echo(json.dumps(result, indent=1) if as_json else serve_table(result))
