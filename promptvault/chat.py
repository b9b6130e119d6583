"""A conversation whose every turn restores the previous turns from the vault.

Each turn renders the whole history with the chat template, so the new prompt starts with the
tokens the previous turn stored: after each answer the live cache is stored up to the end of
the answer as the next turn will render it (promptvault.generate's `store_tokens`), and the next
turn prefills only its own message. A named session keeps its messages in the vault directory
(`sessions/NAME.json`, 0600, written atomically), so a later process resumes it from the stored
cache instead of prefilling the history again.

Documents given with `context` start the first user message (promptvault.prompting), so a
`promptvault warm FILE` of them is reused by the first turn.
"""

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from promptvault.errors import PromptvaultError
from promptvault.generate import RunResult, run_prompt
from promptvault.prompting import encode_messages, user_text

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SESSION_VERSION = 1


class SessionError(PromptvaultError):
    """A session name that cannot be a file name, or a session file that cannot be read."""


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)
    system: str | None = None
    context: list[str] = field(default_factory=list)  # documents that open the first user message

    def ask(self, lm, text: str, *, vault=None, **run_kwargs) -> RunResult:
        """Answer `text` after the history; the answer is appended to the messages."""
        content = user_text(self.context, text) if not self.messages else text
        messages = [*self.messages, {"role": "user", "content": content}]
        tokens = encode_messages(lm.tokenizer, messages, system=self.system)

        def history(answer: str) -> list[int]:
            return encode_messages(lm.tokenizer, [*messages, {"role": "assistant", "content": answer}],
                                   system=self.system, add_generation_prompt=False)

        result = run_prompt(lm, tokens, vault=vault, store_tokens=history, **run_kwargs)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        return result

    def reset(self) -> None:
        self.messages = []


def session_path(vault_root: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise SessionError(f"session name {name!r}: use letters, digits, '.', '_' and '-' (not first)")
    return Path(vault_root) / "sessions" / f"{name}.json"


def load_session(vault_root: Path, name: str) -> Conversation | None:
    """The stored conversation, or None when the session does not exist yet."""
    path = session_path(vault_root, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = data["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages")
        return Conversation(messages=messages, system=data.get("system"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise SessionError(f"{path}: not a readable session file ({e})") from None


def save_session(vault_root: Path, name: str, conversation: Conversation) -> Path:
    """Write the messages to sessions/NAME.json: a temp file in the same directory, fsync,
    os.replace, so a crash leaves the old file or the new one, never half of one."""
    path = session_path(vault_root, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"version": SESSION_VERSION, "system": conversation.system, "messages": conversation.messages}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
