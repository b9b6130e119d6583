"""Run the reliability (fault) suite at full counts and print its figures.

    LD_PRELOAD=... .venv/bin/python scripts/reliability_report.py            # pytest --long, then the table
    .venv/bin/python scripts/reliability_report.py --from results.jsonl     # the table of an earlier run

Each test of tests/test_reliability_*.py appends what it injected, detected and repaired to the
JSON-lines file named by $PROMPTVAULT_RELIABILITY_REPORT; this script sets it, runs
`pytest --long tests/test_reliability_*.py`, and prints one row per fault kind plus the totals
(as a Markdown table, for docs/reliability.md) and the concurrency load held. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLS = ("injected", "detected", "repaired", "wrong_outputs", "data_lost")


def table(records: list[dict]) -> str:
    rows: dict[str, dict] = defaultdict(lambda: dict.fromkeys(COLS, 0))
    for r in records:
        for c in COLS:
            rows[r["kind"]][c] += int(r.get(c, 0))
    lines = ["| fault | injected | detected | repaired | wrong outputs | data lost |", "|---|---|---|---|---|---|"]
    total = dict.fromkeys(COLS, 0)
    for kind, row in rows.items():
        if not row["injected"]:
            continue
        lines.append(f"| {kind} | " + " | ".join(str(row[c]) for c in COLS) + " |")
        for c in COLS:
            total[c] += row[c]
    lines.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in COLS) + " |")
    extra = defaultdict(lambda: defaultdict(int))
    for r in records:
        if not r.get("processes"):
            for k, v in r.items():
                if k not in ("kind", *COLS) and isinstance(v, int):
                    extra[r["kind"]][k] += v
    for kind, fields in extra.items():
        lines.append(f"\n{kind}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in fields.items()))
    load = [r for r in records if r.get("processes")]
    if load:
        lines.append("")
        lines.append("| concurrency | processes | detail |")
        lines.append("|---|---|---|")
        for r in load:
            detail = ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f"{k} {v}"
                               for k, v in r.items() if k not in ("kind", "processes", *COLS))
            lines.append(f"| {r['kind']} | {r['processes']} | {detail} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", help="print the table of an earlier results file, run nothing")
    ap.add_argument("--quick", action="store_true", help="run the quick subset (no --long)")
    ap.add_argument("--out", default=None, help="keep the results (JSON lines) here")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    if args.source:
        print(table([json.loads(line) for line in open(args.source) if line.strip()]))
        return 0
    out = args.out or tempfile.mktemp(prefix="reliability-", suffix=".jsonl")
    Path(out).unlink(missing_ok=True)
    env = {**os.environ, "PROMPTVAULT_RELIABILITY_REPORT": out}
    tests = sorted(glob.glob(str(ROOT / "tests" / "test_reliability_*.py")))
    cmd = [sys.executable, "-m", "pytest", "-q", *([] if args.quick else ["--long"]), *tests, *args.pytest_args]
    start = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    minutes = (time.time() - start) / 60
    records = [json.loads(line) for line in open(out)] if Path(out).exists() else []
    print()
    print(f"reliability suite ({'quick' if args.quick else '--long'}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.machine()} {os.cpu_count()} cores, {minutes:.1f} min, pytest exit {rc}; results in {out}")
    print()
    print(table(records))
    return rc


if __name__ == "__main__":
    sys.exit(main())
