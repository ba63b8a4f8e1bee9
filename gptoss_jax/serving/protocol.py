"""OpenAI's HTTP API in harmony terms: request bodies to harmony conversations and sampling settings,
generated tokens to reasoning, content and tool calls (whole, or as deltas while they stream).

Mapping (as the gpt-oss model card and the peers' servers do it):
  system and developer messages, and `instructions`  -> the developer message's instructions
  user                                               -> user
  assistant content / reasoning / tool_calls         -> final / analysis / commentary to functions.NAME
  tool (tool_call_id), function_call_output (call_id) -> a message from functions.NAME
Generated analysis is the reasoning; commentary addressed to functions.NAME is a tool call; the rest
(final, and commentary preambles) is the content. Harmony itself drops earlier turns' analysis.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptoss_jax.chat.harmony import REASONING_EFFORTS, ChatMessage, StreamDecoder
from gptoss_jax.inference.sampling import SamplingParams

FUNCTION_PREFIX = "functions."
JSON_CONTENT_TYPE = "<|constrain|>json"


class ApiError(Exception):
    """An error the client caused or must hear about, as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


# Reading request bodies.


def field_of(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    """body[name] checked against `kinds` (a 400 naming the field otherwise)."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", name)
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("number" if kind is float else kind.__name__ for kind in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {json.dumps(value)[:80]}", name)
    return value


@dataclass
class Generation:
    """What a request asks of the engine, whatever the endpoint."""

    messages: list[ChatMessage]
    developer: str | None
    tools: list[dict] | None
    reasoning_effort: str
    sampling: SamplingParams
    seed: int | None
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    n: int = 1


def sampling_of(body: dict) -> tuple[SamplingParams, int | None]:
    temperature = field_of(body, "temperature", (int, float), 1.0)
    top_p = field_of(body, "top_p", (int, float), 1.0)
    try:
        sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p))
    except ValueError as error:
        raise ApiError(400, str(error), "temperature" if "temperature" in str(error) else "top_p") from None
    return sampling, field_of(body, "seed", int)


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise ApiError(400, f"{where} must be a string or a list of text parts", where)


def _effort(value: Any, param: str) -> str:
    if value is None:
        return "medium"
    if value not in REASONING_EFFORTS:
        raise ApiError(400, f"{param} must be one of {', '.join(REASONING_EFFORTS)}, got {json.dumps(value)}", param)
    return value


def _tools(body: dict, flat: bool) -> list[dict] | None:
    """Function tools as {"name", "description", "parameters"}; `flat` is the Responses API's layout."""
    tools = field_of(body, "tools", list)
    if not tools or body.get("tool_choice") == "none":
        return None
    out = []
    for index, tool in enumerate(tools):
        spec = tool if flat else (tool.get("function") if isinstance(tool, dict) else None)
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(spec, dict):
            raise ApiError(400, f"tools[{index}]: only function tools are supported", f"tools[{index}]")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(400, f"tools[{index}]: a function needs a name", f"tools[{index}]")
        out.append({"name": spec["name"], "description": spec.get("description") or "",
                    "parameters": spec.get("parameters")})  # fmt: skip
    return out


def _tool_call_message(name: str, arguments: str) -> ChatMessage:
    return ChatMessage("assistant", arguments, "commentary", FUNCTION_PREFIX + name, JSON_CONTENT_TYPE)


def chat_request(body: dict) -> Generation:
    """A /v1/chat/completions body."""
    raw = field_of(body, "messages", list, required=True)
    messages, developer, calls = [], [], {}
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = message.get("role")
        if role in ("system", "developer"):
            developer.append(_text(message.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append(ChatMessage("user", _text(message.get("content"), f"{where}.content")))
        elif role == "assistant":
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if reasoning:
                messages.append(ChatMessage("assistant", _text(reasoning, f"{where}.reasoning"), "analysis"))
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ApiError(400, f"{where}.tool_calls: each needs function.name", f"{where}.tool_calls")
                calls[call.get("id")] = function["name"]
                messages.append(_tool_call_message(function["name"], function.get("arguments") or "{}"))
            content = _text(message.get("content"), f"{where}.content")
            if content:
                messages.append(ChatMessage("assistant", content, "final"))
        elif role == "tool":
            name = calls.get(message.get("tool_call_id"))
            if name is None:
                raise ApiError(400, f"{where}: tool_call_id {json.dumps(message.get('tool_call_id'))} answers no "
                                    "earlier tool call", f"{where}.tool_call_id")  # fmt: skip
            messages.append(ChatMessage("tool", _text(message.get("content"), f"{where}.content"), name=FUNCTION_PREFIX + name))
        else:
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, got "
                                f"{json.dumps(role)}", f"{where}.role")  # fmt: skip
    if not messages:
        raise ApiError(400, "messages holds no user, assistant or tool message", "messages")
    sampling, seed = sampling_of(body)
    max_tokens = field_of(body, "max_completion_tokens", int) or field_of(body, "max_tokens", int)
    stop = field_of(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", "stop")
    n = field_of(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise ApiError(400, f"'n' must be between 1 and 16, got {n}", "n")
    return Generation(messages, "\n\n".join(developer) or None, _tools(body, flat=False),
                      _effort(body.get("reasoning_effort"), "reasoning_effort"), sampling, seed,
                      _positive(max_tokens, "max_tokens"), stop, n)  # fmt: skip


def responses_request(body: dict) -> Generation:
    """A /v1/responses body."""
    raw = field_of(body, "input", (str, list), required=True)
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    messages, developer, calls = [], [], {}
    instructions = field_of(body, "instructions", str)
    if instructions:
        developer.append(instructions)
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                developer.append(text)
            elif role in ("user", "assistant"):
                messages.append(ChatMessage(role, text, "final" if role == "assistant" else None))
            else:
                raise ApiError(400, f"{where}.role must be system, developer, user or assistant, got "
                                    f"{json.dumps(role)}", f"{where}.role")  # fmt: skip
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise ApiError(400, f"{where}: a function_call needs a name", f"{where}.name")
            calls[item.get("call_id")] = item["name"]
            messages.append(_tool_call_message(item["name"], item.get("arguments") or "{}"))
        elif kind == "function_call_output":
            name = calls.get(item.get("call_id"))
            if name is None:
                raise ApiError(400, f"{where}: call_id {json.dumps(item.get('call_id'))} answers no earlier "
                                    "function_call", f"{where}.call_id")  # fmt: skip
            output = item.get("output")
            messages.append(ChatMessage("tool", output if isinstance(output, str) else json.dumps(output),
                                        name=FUNCTION_PREFIX + name))  # fmt: skip
        elif kind == "reasoning":
            text = "".join(part.get("text", "") for part in item.get("content") or [] if isinstance(part, dict))
            if text:
                messages.append(ChatMessage("assistant", text, "analysis"))
        else:
            raise ApiError(400, f"{where}.type {json.dumps(kind)} is not supported", f"{where}.type")
    if not messages:
        raise ApiError(400, "input holds no user, assistant or function_call_output item", "input")
    reasoning = field_of(body, "reasoning", dict, {})
    sampling, seed = sampling_of(body)
    return Generation(messages, "\n\n".join(developer) or None, _tools(body, flat=True),
                      _effort(reasoning.get("effort"), "reasoning.effort"), sampling, seed,
                      _positive(field_of(body, "max_output_tokens", int), "max_output_tokens"))  # fmt: skip


def _positive(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {value}", name)
    return value


# Reading generated tokens.


@dataclass
class Delta:
    """A piece of output as it streams: reasoning text, content text, or a tool call's start or arguments."""

    kind: str  # "reasoning" | "content" | "tool_call" (a call starts: name) | "arguments"
    text: str = ""
    call: int = 0  # which tool call (0, 1, ...) for "tool_call" and "arguments"
    name: str = ""
    call_id: str = ""


@dataclass
class ToolCall:
    call_id: str
    name: str
    arguments: str = ""


class OutputReader:
    """Generated tokens to reasoning, content and tool calls, a token at a time; never raises."""

    def __init__(self, encoding, stop: list[str] | None = None):
        self._decoder = StreamDecoder(encoding)
        self.reasoning, self.content = "", ""
        self.tool_calls: list[ToolCall] = []
        self._call_message: int | None = None  # the finished-message count when the open call began
        self._stop = stop or []
        self.stopped = False  # a stop string was reached: generation should end
        self.tokens = 0  # generated tokens read

    def push(self, token: int) -> list[Delta]:
        self.tokens += 1
        return self._read(self._decoder.push(token))

    def finish(self) -> list[Delta]:
        return self._read(self._decoder.finish())

    def _read(self, pieces: list[tuple[str | None, str]]) -> list[Delta]:
        deltas = self._call_started()
        for channel, text in pieces:
            if self.stopped:
                break
            if self._call_message is not None and (self._decoder.recipient or "").startswith(FUNCTION_PREFIX):
                self.tool_calls[-1].arguments += text
                deltas.append(Delta("arguments", text, len(self.tool_calls) - 1))
            elif channel == "analysis":
                self.reasoning += text
                deltas.append(Delta("reasoning", text))
            else:
                delta = self._content(text)
                if delta.text:
                    deltas.append(delta)
        return deltas + self._call_started()

    def _call_started(self) -> list[Delta]:
        recipient = self._decoder.recipient or ""
        finished = self._decoder.finished_messages
        if not recipient.startswith(FUNCTION_PREFIX) or self._call_message == finished:
            return []
        self._call_message = finished
        call = ToolCall(new_id("call_"), recipient[len(FUNCTION_PREFIX) :])
        self.tool_calls.append(call)
        return [Delta("tool_call", call=len(self.tool_calls) - 1, name=call.name, call_id=call.call_id)]

    def _content(self, text: str) -> Delta:
        before = len(self.content)
        self.content += text
        for stop in self._stop:
            at = self.content.find(stop, max(0, before - len(stop)))
            if at >= 0:
                self.stopped = True
                self.content = self.content[:at]
        return Delta("content", self.content[before:] if len(self.content) > before else "")
