"""Request bodies -> a validated, tokenized `Generation`, or a `RequestError` with its HTTP status.

Parameters and their checks follow mlx-lm's server (`temperature` >= 0, `top_p` in [0, 1],
`max_tokens` >= 1, `seed` an int, `stop` a string or a list of strings), with OpenAI's and
Anthropic's field names. `max_tokens` may not exceed the server's --max-tokens-cap, and the
prompt plus `max_tokens` must fit the model's context (when `max_tokens` is not given it is the
smaller of 512, the cap and the room left).
"""

from __future__ import annotations

from dataclasses import dataclass

from promptvault.server.worker import Generation

DEFAULT_MAX_TOKENS = 512  # as mlx_lm.server
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


class RequestError(Exception):
    """A request the server will not run: HTTP status, message, OpenAI error type/param/code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Limits:
    model_names: set[str]  # names a request may ask for
    context: int | None  # the model's context length in tokens (None: its config does not say)
    max_tokens_cap: int


@dataclass
class Parsed:
    generation: Generation
    model: str  # the name to echo back
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


def _number(body: dict, name: str, default: float, low: float, high: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number", name)
    if value < low or (high is not None and value > high):
        raise _bad(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}", name)
    return float(value)


def _stop(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _bad(f"{name} must be a string or a list of strings", name)


def _model(body: dict, limits: Limits) -> str:
    model = body.get("model")
    if model is None:
        return sorted(limits.model_names)[0]
    if not isinstance(model, str):
        raise _bad("model must be a string", "model")
    if model not in limits.model_names:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves "
                                f"{', '.join(sorted(limits.model_names))}", param="model", code="model_not_found")
    return model


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where}: content must be a string or a list of text parts", where)


def _messages(body: dict, roles: set[str]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in roles:
            raise _bad(f"messages[{i}].role must be one of {', '.join(sorted(roles))}, got {role!r}",
                       f"messages[{i}].role")
        content = m.get("content")
        out.append({"role": "system" if role == "developer" else role,
                    "content": "" if content is None and role == "assistant" else _text(content, f"messages[{i}].content")})
    return out


def _generation(tokens: list[int], body: dict, limits: Limits, *, max_name: str, stop_name: str,
                required_max: bool = False) -> Generation:
    if not tokens:
        raise _bad("the prompt encodes to no tokens")
    room = limits.context - len(tokens) if limits.context else limits.max_tokens_cap
    if room < 1:
        raise _bad(f"the prompt is {len(tokens)} tokens; this model's context is {limits.context}",
                   code="context_length_exceeded")
    value = body.get(max_name)
    if value is None and max_name == "max_tokens":
        value = body.get("max_completion_tokens")
    if value is None:
        if required_max:
            raise _bad(f"{max_name} is required", max_name)
        value = min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap, room)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{max_name} must be an integer", max_name)
    if not 1 <= value <= limits.max_tokens_cap:
        raise _bad(f"{max_name} must be in [1, {limits.max_tokens_cap}], got {value}", max_name)
    if value > room:
        raise _bad(f"the prompt ({len(tokens)} tokens) plus {max_name} ({value}) exceeds this model's context "
                   f"({limits.context})", max_name, code="context_length_exceeded")
    if body.get("n", 1) != 1:
        raise _bad("n must be 1: one choice per request", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported by this server", "logprobs")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed")
    return Generation(tokens=tokens, max_tokens=value, temperature=_number(body, "temperature", 0.0, 0.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=_stop(body, stop_name))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _chat_tokens(tokenizer, messages: list[dict], tools=None) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise _bad("this model has no chat template: use /v1/completions")
    kwargs = {"tools": tools} if tools else {}
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs))


def chat(body: dict, tokenizer, limits: Limits) -> Parsed:
    """POST /v1/chat/completions."""
    model = _model(body, limits)
    stream, usage = _stream(body)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    tokens = _chat_tokens(tokenizer, _messages(body, CHAT_ROLES), tools)
    gen = _generation(tokens, body, limits, max_name="max_tokens", stop_name="stop")
    return Parsed(gen, model, stream, usage)


def completion(body: dict, tokenizer, limits: Limits) -> Parsed:
    """POST /v1/completions: the prompt as is (a string, or a list of token ids)."""
    model = _model(body, limits)
    stream, usage = _stream(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = list(tokenizer.encode(prompt, add_special_tokens=True))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise _bad("prompt holds token ids outside the vocabulary", "prompt")
        tokens = list(prompt)
    else:
        raise _bad("prompt must be a string or a non-empty list of token ids (one prompt per request)", "prompt")
    gen = _generation(tokens, body, limits, max_name="max_tokens", stop_name="stop")
    return Parsed(gen, model, stream, usage)


def messages(body: dict, tokenizer, limits: Limits) -> Parsed:
    """POST /v1/messages (Anthropic): `system` apart from the user/assistant turns."""
    model = _model(body, limits)
    stream, _ = _stream(body)
    turns = _messages(body, {"user", "assistant"})
    system = body.get("system")
    if system is not None:
        turns = [{"role": "system", "content": _text(system, "system")}, *turns]
    gen = _generation(_chat_tokens(tokenizer, turns), body, limits, max_name="max_tokens",
                      stop_name="stop_sequences", required_max=True)
    return Parsed(gen, model, stream, False)
