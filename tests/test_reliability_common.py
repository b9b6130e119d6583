"""Shared helpers of the reliability (fault) suite: real `promptvault` processes on real vault
directories, the real default model (SmolLM2-135M), lossless codecs wherever text is compared with
a cold run (so equality is exact), and the default (lossy) codec where two writers of one chunk
can compute different bytes (outputs then compared with a restore of the same chunks). No tests here.

Each test records what it injected into the JSON-lines file named by $PROMPTVAULT_RELIABILITY_REPORT
(if set); `scripts/reliability_report.py` runs `pytest --long` with it and prints the totals.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from promptvault.cli.common import make_codec
from promptvault.generate import run_prompt
from promptvault.prompting import context_prefix
from promptvault.sources import Prompt, prompt_tokens
from promptvault.vault import Vault
from promptvault.vault.shards import SUFFIX

EXE = shutil.which("promptvault", path=str(Path(sys.executable).parent)) or "promptvault"
LOSSLESS = ["--key-bits", "lossless", "--value-bits", "lossless"]
CODEC = make_codec("lossless", "lossless")
BLOCK = 32
DOC = Path(__file__).parents[1] / "examples" / "data" / "licenses.txt"
QUESTION = "\n\nQuestion: Which license is this? Answer:"
MAX_TOKENS = 6


def is_long(request) -> bool:
    return bool(request.config.getoption("--long"))


def text(start: int, chars: int) -> str:
    """A slice of real text (the license file), starting at a line boundary."""
    full = DOC.read_text()
    start = full.find("\n", start) + 1 if start else 0
    return full[start : start + chars]


def pv(*args, check=False, timeout=300, prefix=(), **kw) -> subprocess.CompletedProcess:
    """Run the installed `promptvault` executable (behind `prefix`, e.g. setpriv)."""
    res = subprocess.run([*prefix, EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def tokens(lm, prompt_text: str) -> list[int]:
    """The tokens `run --prompt-file FILE` uses for a plain-text prompt (chat template applied)."""
    return prompt_tokens(lm.tokenizer, Prompt(source="x", text=prompt_text.strip()), chat=True)


def doc_tokens(lm, doc_text: str) -> list[int]:
    """The tokens `warm FILE` stores for a plain-text document (the start of every run about it)."""
    return context_prefix(lm.tokenizer, [doc_text], raw=False)


def cold_text(lm, toks) -> str:
    return run_prompt(lm, toks, vault=None, max_tokens=MAX_TOKENS).text


def vault_run(lm, path, toks, codec=CODEC, **vault_kw):
    """Generate from the vault (lossless codec unless given), storing nothing: (text, tokens reused)."""
    with Vault(path, codec=codec, **vault_kw) as vault:
        r = run_prompt(lm, toks, vault=vault, save=False, max_tokens=MAX_TOKENS)
    return r.text, r.reused_tokens


def shard_files(path) -> set[str]:
    """Shard files on disk (relative to shards/), temp files excluded."""
    root = Path(path) / "shards"
    return {str(p.relative_to(root)) for p in root.rglob(f"*{SUFFIX}") if not p.name.startswith(".tmp-")}


def temp_files(path) -> list[Path]:
    return [p for p in (Path(path) / "shards").rglob(".tmp-*")]


def index_rows(path) -> list[dict]:
    with Vault(path) as vault:
        return vault.index.all_chunks()


def record(kind: str, **counts) -> None:
    """Append one fault record (injected, detected, repaired, wrong_outputs, data_lost, …)."""
    out = os.environ.get("PROMPTVAULT_RELIABILITY_REPORT")
    if not out:
        return
    with open(out, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({"kind": kind, **counts}) + "\n")
