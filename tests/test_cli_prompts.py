"""`run` / `warm` as a new user meets them (issues T2.2 and T2.0): the chat template by default,
a document and a question (`warm FILE` then `run --context FILE -p Q`), the documented
`--messages` shapes, one prompt per run, `rm` of an unknown label, and `--quality` presets.
Real SmolLM2-135M-Instruct, real vault directories."""

import json
import re
from pathlib import Path

import pytest

from promptvault.cli.quality import QUALITY
from promptvault.prompting import user_text
from test_cli import DOC, assert_one_line_error, cli, ok_json

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    """~420 tokens of the Apache-2.0 license (the start of the demo's document)."""
    path = tmp_path_factory.mktemp("doc") / "apache.txt"
    path.write_text(DOC.read_text()[:2000])
    return path


def test_run_applies_the_chat_template_by_default(smollm, tmp_path):
    chat = ok_json("run", "-p", "What is the capital of France?", "--max-tokens", 12, "--no-vault")
    raw = ok_json("run", "-p", "What is the capital of France?", "--max-tokens", 12, "--no-vault", "--raw")
    alias = ok_json("run", "-p", "What is the capital of France?", "--max-tokens", 1, "--no-vault",
                    "--ignore-chat-template")
    assert "Paris" in chat["text"]
    assert raw["prompt_tokens"] == alias["prompt_tokens"] < chat["prompt_tokens"] - 20  # no template around it
    assert_one_line_error(cli("run", "-p", "hi", "--chat", "--vault", tmp_path / "v"), 2, "--chat", "--raw")


@pytest.mark.parametrize("raw", [[], ["--raw"]], ids=["chat", "raw"])
def test_warm_stores_exactly_the_prefix_a_context_run_starts_with(smollm, doc, tmp_path, raw):
    vault = tmp_path / "v"
    common = ["--vault", vault, "--block-size", 64, "--quality", "exact", *raw]
    [warmed] = ok_json("warm", doc, *common)["prompts"]
    doc_tokens = len(smollm.tokenizer.encode(doc.read_text().strip(), add_special_tokens=False))
    for question in ("Which license is this?", "2 + 2 = ?", "(a) Apache or (b) MIT?"):
        out = ok_json("run", "--context", doc, "-p", question, "--max-tokens", 1, "--no-save", *common)
        assert out["reused_tokens"] == warmed["tokens"], question  # all of it: a true token prefix
        assert out["reused_tokens"] >= 0.95 * doc_tokens
    # A file holding the document then the question starts with the same tokens.
    both = tmp_path / "both.txt"
    both.write_text(user_text([doc.read_text()], "Which license is this?"))
    assert ok_json("run", "--prompt-file", both, "--max-tokens", 1, "--no-save", *common)["reused_tokens"] == \
        warmed["tokens"]


def test_warm_join_stores_several_documents_as_one_context(smollm, tmp_path):
    text = DOC.read_text()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:700])
    b.write_text(text[700:1400])
    common = ["--vault", tmp_path / "v", "--block-size", 32, "--quality", "exact"]
    [joined] = ok_json("warm", "--join", a, b, *common)["prompts"]
    out = ok_json("run", "--context", a, "--context", b, "-p", "Which license?", "--max-tokens", 1, "--no-save",
                  *common)
    assert out["reused_tokens"] == joined["tokens"]
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    assert_one_line_error(cli("run", "--context", a, "--messages", messages, *common), 2, "--context")


def test_run_messages_takes_the_documented_shapes(smollm, tmp_path):
    conversation = [{"role": "user", "content": "Name a color."}]
    shapes = {"list.json": conversation, "object.json": {"messages": conversation}, "nested.json": [conversation]}
    tokens = set()
    for name, data in shapes.items():
        (tmp_path / name).write_text(json.dumps(data))
        out = ok_json("run", "--messages", tmp_path / name, "--max-tokens", 1, "--no-vault")
        tokens.add(out["prompt_tokens"])
    assert len(tokens) == 1
    (tmp_path / "two.json").write_text(json.dumps([conversation, conversation]))
    assert_one_line_error(cli("run", "--messages", tmp_path / "two.json", "--no-vault"), 1, "two.json", "2 prompts")


def test_run_refuses_sources_with_several_prompts(tmp_path):
    (tmp_path / "two.json").write_text(json.dumps([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]))
    (tmp_path / "two.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "one.txt").write_text("a")
    for source, fragment in (("two.json", "2 prompts"), ("two.jsonl", "2 prompts"), ("dir", "directory")):
        assert_one_line_error(cli("run", "--prompt-file", tmp_path / source, "--vault", tmp_path / "v"), 1,
                              source, fragment)


def test_rm_of_an_unknown_label_fails(tmp_path):
    assert_one_line_error(cli("rm", "no-such-label", "--vault", tmp_path / "v"), 1, "no-such-label")


def test_quality_presets(smollm, doc, tmp_path):
    vault = tmp_path / "v"
    assert_one_line_error(cli("warm", doc, "--quality", "high", "--key-bits", "4", "--vault", vault), 2,
                          "--quality")
    ok_json("warm", doc, "--quality", "small", "--vault", vault)
    ok_json("warm", doc, "--quality", "high", "--vault", vault)
    stats = ok_json("stats", "--vault", vault)
    assert sorted(n["quality"] for n in stats["namespaces"]) == ["high", "small"]
    small = next(n for n in stats["namespaces"] if n["quality"] == "small")
    assert small["ratio_vs_fp16"] >= 5.0
    assert "small" in cli("stats", "--vault", vault).stdout
    help_text = cli("run", "--help").stdout
    readme = README.read_text()
    for q in QUALITY.values():
        assert q.name in help_text
        # Each preset is backed by a row of the README's fidelity tables.
        assert re.search(rf"^\| `{re.escape(q.setting)}` \|", readme, re.M), q.setting
