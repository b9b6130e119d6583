"""`promptvault bench serve` on a tiny trace (2 conversations x 2 turns, one restart), promptvault
only: the rows come out, and the vault outlives the restart (mlx_lm.server's side is exercised by
the real bench run in the README)."""

from promptvault.bench.serve import format_table, run_serve_bench


def test_bench_serve_replays_the_trace_through_a_restart(smollm, tmp_path):
    result = run_serve_bench("smollm2", conversations=2, turns=2, system_tokens=300, max_tokens=2,
                             setups=["promptvault"], workdir=str(tmp_path))
    rows = {row["phase"]: row for row in result["rows"]}
    assert rows["before restart"]["requests"] == 2 and rows["after restart"]["requests"] == 2
    assert rows["all"]["ttft_p50_s"] > 0 and "promptvault" in format_table(result)
    after = [q for q in result["requests"] if q["phase"] == "after restart"]
    # Each conversation's first turn (system prompt, ask, answer) was stored before the restart.
    assert all(q["cached_tokens"] >= 256 for q in after), after
