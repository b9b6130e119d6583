"""Redraw docs/fidelity_pareto.png from every 20-prompt setting measured: the first run's tables
in docs/fidelity.md (its raw JSON was not kept) and sweep 2's raw JSON in docs/results/. One plot for
both runs, since `bench fidelity --plot` draws only the settings of the run it makes.

    LD_PRELOAD=… .venv/bin/python scripts/fidelity_pareto.py
"""
import json
import re
from pathlib import Path

from promptvault.bench.fidelity import plot, pareto
text = Path("docs/fidelity.md").read_text()
results = []
for model, key, nice in (("smollm2", "### SmolLM2-135M-Instruct (20", "SmolLM2-135M-Instruct"),
                          ("gemma3-270m", "### Gemma-3-270M (20", "Gemma-3-270M")):
    sec = text[text.index(key):]
    sec = sec[: sec.index("Pareto front")]
    rows = {}
    for line in sec.splitlines():
        m = re.match(r"\| `([^`]+)` \| [^|]+ \| ([\d.]+)x \| ([\d.]+) \|", line)
        if m:
            rows[m[1]] = {"setting": m[1], "ratio_vs_fp16": float(m[2]), "kl": float(m[3])}
    for tag in ("full", "full2", "full3"):
        d = json.load(open(f"docs/results/fidelity-sweep2-{tag}-{model}.json"))
        for r in d["rows"]:
            if r["ratio_vs_fp16"] >= 1.0:  # diagnosis rows with lossless keys/values are left out
                rows[r["setting"]] = {k: r[k] for k in ("setting", "ratio_vs_fp16", "kl")}
    results.append({"model": nice, "prompts": 20, "prefix": 1024, "rows": list(rows.values())})
    print(nice, len(rows), "settings; front:", ", ".join(pareto([r for r in rows.values() if r["kl"] > 0])))
plot(results, Path("docs/fidelity_pareto.png"))
