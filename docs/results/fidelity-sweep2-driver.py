"""Issue 9 sweep 2 driver: run_fidelity on an explicit prompt subset, checkpointing JSON.

usage: run.py MODEL SUBSET OUT.json SETTING[,SETTING...]
SUBSET: 'full' = the 20-prompt protocol of README.md (Fidelity results) (all 23 minus prose-gpl-3-2,
prose-lgpl-2.1-1, code-calendar); 'left' = those 3; 'probe' = prose-gfdl-1.3-0, code-heapq, chat-0.
"""

import json
import sys
import time
from pathlib import Path

import promptvault
from promptvault.bench.fidelity import load_prompts, run_fidelity
from promptvault.models import load_model

LEFT_OUT = {"prose-gpl-3-2", "prose-lgpl-2.1-1", "code-calendar"}
PROBE = ["prose-gfdl-1.3-0", "code-heapq", "chat-0"]

model, subset, out, settings = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
prompts = load_prompts()
if subset == "full":
    prompts = [p for p in prompts if p["id"] not in LEFT_OUT]
    assert len(prompts) == 20
elif subset == "left":  # the 3 prompts the 20-prompt protocol leaves out
    prompts = [p for p in prompts if p["id"] in LEFT_OUT]
else:
    prompts = [p for p in prompts if p["id"] in PROBE]
print("promptvault from", promptvault.__file__, "prompts", [p["id"] for p in prompts], file=sys.stderr, flush=True)
lm = load_model(model)
t0 = time.time()


def save(res):
    res = dict(res, subset=subset, prompt_ids=[p["id"] for p in prompts], elapsed_s=time.time() - t0)
    out.write_text(json.dumps(res, indent=1))


res = run_fidelity(lm, settings, prompts=prompts, prefix=1024, greedy_settings=[],
                   cache_dir=Path("/tmp/pv/fidcache"), log=lambda m: print(m, file=sys.stderr, flush=True),
                   checkpoint=save)
save(res)
for r in res["rows"]:
    print(f"{r['setting']:32s} {r['ratio_vs_fp16']:.3f}x KL {r['kl']:.5f} top1 {100 * r['top1']:.1f}% ppl {r['ppl']:.3f}")
