"""Prompts to warm or run, read from files, directories, stdin, JSON and JSONL.

Accepted shapes (the same files vllm-mlx's `--warm-prompts` takes, plus plain text):
  - a text file (or `-` for stdin): one prompt, its whole text;
  - a directory: every regular, non-hidden file below it, in sorted order, as text prompts;
  - `.json`: one chat conversation (a list of {"role", "content"} messages, or
    {"messages": [...]}), a list of strings, or a list of conversations;
  - `.jsonl`: one object per line, {"prompt": "..."} or {"messages": [...]}.
Malformed input is a PromptSourceError naming the file (and line), never a partial result.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from promptvault.errors import PromptvaultError
from promptvault.prompting import encode, encode_messages, has_chat_template


class PromptSourceError(PromptvaultError):
    """A prompt source that is missing, unreadable, malformed or empty."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: raw `text`, or chat `messages` (rendered with the model's chat template)."""

    source: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None


def _check_messages(messages, where: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise PromptSourceError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptSourceError(f"{where}: each message needs string 'role' and 'content' fields")
    return tuple(dict(m) for m in messages)


def _text_prompt(text: str, where: str) -> Prompt:
    if not text.strip():
        raise PromptSourceError(f"{where}: empty prompt")
    return Prompt(source=where, text=text)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptSourceError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise PromptSourceError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise PromptSourceError(f"{path}: cannot read ({e.strerror})") from None


def _from_json(path: Path) -> list[Prompt]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise PromptSourceError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and "messages" in data:
        return [Prompt(source=str(path), messages=_check_messages(data["messages"], str(path)))]
    if not isinstance(data, list) or not data:
        raise PromptSourceError(f"{path}: expected a non-empty JSON list of strings or of message lists, "
                                'or {"messages": [...]}')
    if all(isinstance(item, dict) for item in data):  # one conversation: [{role, content}, …]
        return [Prompt(source=str(path), messages=_check_messages(data, str(path)))]
    prompts = []
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if isinstance(item, str):
            prompts.append(_text_prompt(item, where))
        else:
            prompts.append(Prompt(source=where, messages=_check_messages(item, where)))
    return prompts


def _from_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSourceError(f"{where}: malformed JSON line: {e.msg}") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(_text_prompt(item["prompt"], where))
        elif isinstance(item, dict) and "messages" in item:
            prompts.append(Prompt(source=where, messages=_check_messages(item["messages"], where)))
        else:
            raise PromptSourceError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not prompts:
        raise PromptSourceError(f"{path}: no prompts in file")
    return prompts


def _from_path(path: Path) -> list[Prompt]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
        if not files:
            raise PromptSourceError(f"{path}: directory holds no files")
        return [prompt for f in files for prompt in _from_path(f)]
    if not path.exists():
        raise PromptSourceError(f"{path}: no such file or directory")
    if path.suffix == ".json":
        return _from_json(path)
    if path.suffix == ".jsonl":
        return _from_jsonl(path)
    return [_text_prompt(read_text(path), str(path))]


def read_sources(sources: list[str], stdin=None) -> list[Prompt]:
    """Every prompt in `sources` (paths, or "-" for `stdin`, default sys.stdin), in order."""
    if not sources:
        raise PromptSourceError("no prompt sources given")
    prompts = []
    for source in sources:
        if source == "-":
            prompts.append(_text_prompt((stdin or sys.stdin).read(), "<stdin>"))
        else:
            prompts.extend(_from_path(Path(source)))
    return prompts


def prompt_tokens(tokenizer, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a prompt: messages through the chat template (with the generation prompt
    appended, as a run would use them); text raw, or as one user message when `chat` (see
    promptvault.prompting for the CLI's chat-by-default rules)."""
    if prompt.messages is not None:
        if not has_chat_template(tokenizer):
            raise PromptSourceError(f"{prompt.source}: the model has no chat template for chat messages")
        return encode_messages(tokenizer, list(prompt.messages), system=system)
    return encode(tokenizer, prompt.text, raw=not (chat or system), system=system)
