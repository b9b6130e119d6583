#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct, offline): warm a ~4,200-token
# document once, then ask a question about it twice through the chat template (from the vault,
# then cold with --no-vault) and compare the time to first token. `run --context FILE -p Q`
# starts with exactly the tokens `warm FILE` stored. Uses a throwaway vault unless
# PROMPTVAULT_HOME is set.
set -euo pipefail
cd "$(dirname "$0")/.."
pv=${PROMPTVAULT:-promptvault}
export PROMPTVAULT_HOME=${PROMPTVAULT_HOME:-$(mktemp -d)/vault}
doc=examples/data/licenses.txt
question=${QUESTION:-"When was version 3 of the GNU Lesser General Public License published?"}
out=$(mktemp)

echo "== promptvault warm $doc   (vault: $PROMPTVAULT_HOME)"
"$pv" warm "$doc"
echo
echo "== promptvault run --context $doc -p \"$question\""
"$pv" run --context "$doc" -p "$question" --max-tokens 40 --json > "$out.vault.json"
echo
echo "== the same run with --no-vault"
"$pv" run --context "$doc" -p "$question" --max-tokens 40 --no-vault --json > "$out.cold.json"
python3 - "$out.vault.json" "$out.cold.json" <<'PY'
import json, sys
vault, cold = (json.load(open(p)) for p in sys.argv[1:])
print(f"answer (vault): {vault['text'].strip()[:200]!r}")
print(f"answer (cold):  {cold['text'].strip()[:200]!r}")
print(f"{'':8}{'prompt':>8}{'reused':>8}{'restore s':>11}{'prefill s':>11}{'TTFT s':>9}")
for name, r in (("vault", vault), ("cold", cold)):
    print(f"{name:8}{r['prompt_tokens']:>8}{r['reused_tokens']:>8}{r['restore_s']:>11.3f}{r['prefill_s']:>11.3f}{r['ttft_s']:>9.3f}")
print(f"time to first token: {cold['ttft_s'] / vault['ttft_s']:.1f}x lower from the vault")
PY
