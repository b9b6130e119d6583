"""Response bodies and server-sent events, in OpenAI's and Anthropic's shapes.

OpenAI (as mlx_lm.server sends them): a stream is `data: {chunk}` lines ending with
`data: [DONE]`; the first chat chunk carries the assistant role, the last one the finish
reason, and with `stream_options.include_usage` one more chunk with empty `choices` carries the
usage. `usage.prompt_tokens_details.cached_tokens` is the number of prompt tokens restored from
the vault. Anthropic: `event: NAME` + `data: {…}` pairs (message_start, content_block_start,
content_block_delta…, content_block_stop, message_delta, message_stop); its `input_tokens`
counts the prompt tokens that were not read from the cache, `cache_read_input_tokens` the rest.
"""

from __future__ import annotations

import json
import time
import uuid

from promptvault.server.worker import Finished


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class OpenAIShape:
    """Bodies and chunks of one chat (`chat=True`) or text completion."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl-" if chat else "cmpl-")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _choice(self, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if stream:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, text: str, done: Finished) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [self._choice(text, done.finish_reason, False)], "usage": usage(done)}

    def _chunk(self, choices: list) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}

    def start(self) -> str | None:
        return sse(self._chunk([self._choice(None, None, True, first=True)])) if self.chat else None

    def piece(self, text: str) -> str:
        return sse(self._chunk([self._choice(text, None, True)]))

    def end(self, done: Finished, include_usage: bool) -> str:
        out = sse(self._chunk([self._choice(None if self.chat else "", done.finish_reason, True)]))
        if include_usage:
            out += sse({**self._chunk([]), "usage": usage(done)})
        return out + sse("[DONE]")


def _stop_reason(done: Finished) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def _anthropic_usage(done: Finished) -> dict:
    return {"input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0}


class AnthropicShape:
    def __init__(self, model: str):
        self.model, self.id = model, new_id("msg_")

    def _message(self, content: list, done: Finished) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": _stop_reason(done) if done.completion_tokens else None,
                "stop_sequence": done.stop_sequence, "usage": _anthropic_usage(done)}

    def whole(self, text: str, done: Finished) -> dict:
        return self._message([{"type": "text", "text": text}], done)

    def start(self, prompt_tokens: int, cached: int) -> str:
        """message_start (sent once the stored prefix is restored, so its usage is exact) and the text block's start."""
        so_far = Finished(prompt_tokens, 0, cached, "stop", None)
        return (event("message_start", {"type": "message_start", "message": self._message([], so_far)})
                + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}))

    def piece(self, text: str) -> str:
        return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": text}})

    def end(self, done: Finished) -> str:
        return (event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": _stop_reason(done),
                                                    "stop_sequence": done.stop_sequence},
                                          "usage": _anthropic_usage(done)})
                + event("message_stop", {"type": "message_stop"}))
