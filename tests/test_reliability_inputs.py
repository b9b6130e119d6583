"""Issue 4's bad-input table, through the real `promptvault` executable: every case is one line
on stderr (`error: …`), a non-zero exit, no traceback, and nothing written to the vault."""

from __future__ import annotations

from test_reliability_common import BLOCK, pv, record, text


def _cases(tmp):
    good = tmp / "good.txt"
    good.write_text(text(0, 300))
    binary = tmp / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    empty = tmp / "empty.txt"
    empty.write_text(" \n\t\n")
    bad_json = tmp / "p.json"
    bad_json.write_text('[\n  "ok",\n  "missing quote\n]')
    bad_jsonl = tmp / "p.jsonl"
    bad_jsonl.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": \n')
    shape_jsonl = tmp / "q.jsonl"
    shape_jsonl.write_text('{"text": "no prompt key"}\n')
    blocker = tmp / "a-file"
    blocker.write_text("x")
    v = tmp / "v"
    return {
        "missing source": (["warm", tmp / "nope.txt", "--vault", v], 1, ["nope.txt", "no such file"]),
        "source is a directory with nothing in it": (["warm", _empty_dir(tmp), "--vault", v], 1, ["no"]),
        "unreadable source (not UTF-8)": (["warm", binary, "--vault", v], 1, ["blob.bin", "UTF-8"]),
        "empty prompt file": (["warm", empty, "--vault", v], 1, ["empty prompt"]),
        "empty --prompt": (["run", "--prompt", "", "--vault", v], 1, ["empty prompt"]),
        "malformed JSON": (["warm", bad_json, "--vault", v], 1, ["p.json", "line 3"]),
        "malformed JSONL": (["warm", bad_jsonl, "--vault", v], 1, ["p.jsonl:3"]),
        "JSONL without prompt": (["warm", shape_jsonl, "--vault", v], 1, ["q.jsonl:1"]),
        "unknown model": (["run", "--prompt", "hi", "--model", tmp / "no-such-model", "--vault", v], 1, ["model"]),
        "vault path not writable": (["warm", good, "--vault", blocker / "vault"], 1, ["vault", "not usable"]),
        "invalid key bits": (["run", "--prompt", "hi", "--key-bits", "9", "--vault", v], 2, ["--key-bits"]),
        "invalid value bits": (["warm", good, "--value-bits", "zero", "--vault", v], 2, ["--value-bits"]),
        "block size 0": (["warm", good, "--block-size", "0", "--vault", v], 2, ["--block-size"]),
        "disk cap too small for one block": (["warm", good, "--disk-cap", "4K", "--block-size", BLOCK,
                                              "--vault", v], 1, ["cap", "smaller than one block"]),
        "malformed disk cap": (["warm", good, "--disk-cap", "lots", "--vault", v], 2, ["--disk-cap"]),
    }


def _empty_dir(tmp):
    d = tmp / "emptydir"
    d.mkdir(exist_ok=True)
    return d


def test_bad_inputs_through_the_executable(smollm, tmp_path):
    cases = _cases(tmp_path)
    failures = []
    for name, (args, code, fragments) in cases.items():
        res = pv(*args)
        err = res.stderr.strip()
        ok = (res.returncode == code and err.startswith("error: ") and "\n" not in err
              and "Traceback" not in res.stderr and all(f in err for f in fragments) and not res.stdout.strip())
        if not ok:
            failures.append(f"{name}: rc={res.returncode} stderr={res.stderr!r}")
    v = tmp_path / "v"
    stored = list((v / "shards").rglob("*.safetensors")) if v.exists() else []
    assert not failures, "\n".join(failures)
    assert stored == []
    record("bad input (issue 4 table)", injected=len(cases), detected=len(cases), repaired=0, wrong_outputs=0,
           data_lost=0)
