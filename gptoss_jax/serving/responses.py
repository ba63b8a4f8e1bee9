"""The bodies the server sends: chat completions and their chunks, Responses API objects and their
streamed events, and the Prometheus metrics text."""

from __future__ import annotations

import time

from gptoss_jax.serving.protocol import Delta, Generation, OutputReader, new_id


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class Chat:
    """One /v1/chat/completions answer: whole, or as chunks."""

    def __init__(self, completion_id: str, created: int, model: str, prompt_tokens: int):
        self.head = {"id": completion_id, "created": created, "model": model}
        self.prompt_tokens = prompt_tokens

    def completion(self, readers: list[OutputReader], finishes: list[str]) -> dict:
        choices = []
        for index, (reader, finish) in enumerate(zip(readers, finishes)):
            message = {"role": "assistant", "content": reader.content or None}
            if reader.reasoning:
                message["reasoning"] = message["reasoning_content"] = reader.reasoning
            if reader.tool_calls:
                message["tool_calls"] = [
                    {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call in reader.tool_calls
                ]
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
        usage = _usage(self.prompt_tokens, sum(reader.tokens for reader in readers))
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": usage}

    def _chunk(self, choices: list[dict]) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": choices}

    def first_chunk(self, n: int) -> dict:
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)])

    def chunks(self, index: int, deltas: list[Delta], finish: str | None) -> list[dict]:
        out = []
        for delta in deltas:
            if delta.kind == "reasoning":
                body = {"reasoning": delta.text, "reasoning_content": delta.text}
            elif delta.kind == "content":
                body = {"content": delta.text}
            elif delta.kind == "tool_call":
                body = {"tool_calls": [{"index": delta.call, "id": delta.call_id, "type": "function",
                                        "function": {"name": delta.name, "arguments": ""}}]}  # fmt: skip
            else:
                body = {"tool_calls": [{"index": delta.call, "function": {"arguments": delta.text}}]}
            out.append(self._chunk([{"index": index, "delta": body, "finish_reason": None}]))
        if finish:
            out.append(self._chunk([{"index": index, "delta": {}, "finish_reason": finish}]))
        return out

    def usage_chunk(self, readers: list[OutputReader]) -> dict:
        return {**self._chunk([]), "usage": _usage(self.prompt_tokens, sum(reader.tokens for reader in readers))}


class ResponseBuilder:
    """One /v1/responses answer, built from deltas as they come; `start`/`push`/`finish` return the
    streamed events, and `response` is the whole object."""

    def __init__(self, model: str, body: dict, gen: Generation, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.response = {
            "id": new_id("resp_"), "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": gen.max_tokens, "metadata": {},
            "output": [], "parallel_tool_calls": False, "reasoning": {"effort": gen.reasoning_effort, "summary": None},
            "temperature": gen.sampling.temperature, "top_p": gen.sampling.top_p, "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [], "usage": None,
        }  # fmt: skip
        self._sequence = 0
        self._open: dict | None = None  # the output item receiving deltas
        self._open_kind = ""

    def _event(self, kind: str, **fields) -> dict:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence - 1, **fields}

    def start(self) -> list[dict]:
        snapshot = {**self.response, "output": []}
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def push(self, deltas: list[Delta]) -> list[dict]:
        events = []
        for delta in deltas:
            kind = "function_call" if delta.kind in ("tool_call", "arguments") else delta.kind
            if self._open is None or kind != self._open_kind or delta.kind == "tool_call":
                events += self._close() + self._begin(kind, delta)
            events += self._add(delta)
        return events

    def finish(self, reader: OutputReader, finish: str) -> list[dict]:
        events = self._close()
        incomplete = finish == "length"
        reasoning_tokens = 0 if not reader.reasoning else reader.tokens  # an upper bound: harmony headers included
        self.response.update(
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage={"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": reader.tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                   "total_tokens": self.prompt_tokens + reader.tokens},
        )  # fmt: skip
        return events + [self._event("response.incomplete" if incomplete else "response.completed", response=self.response)]

    def _index(self) -> int:
        return len(self.response["output"]) - 1

    def _begin(self, kind: str, delta: Delta) -> list[dict]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [{"type": "reasoning_text", "text": ""}]}
        elif kind == "content":
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}  # fmt: skip
        else:
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": delta.call_id, "name": delta.name,
                    "arguments": "", "status": "in_progress"}  # fmt: skip
        self.response["output"].append(item)
        self._open, self._open_kind = item, kind
        events = [self._event("response.output_item.added", output_index=self._index(), item=_copy(item))]
        if kind != "function_call":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                                      content_index=0, part=_copy(item["content"][0])))  # fmt: skip
        return events

    def _add(self, delta: Delta) -> list[dict]:
        item, where = self._open, {"item_id": self._open["id"], "output_index": self._index()}
        if delta.kind == "tool_call":
            return []
        if delta.kind == "arguments":
            item["arguments"] += delta.text
            return [self._event("response.function_call_arguments.delta", **where, delta=delta.text)]
        item["content"][0]["text"] += delta.text
        kind = "response.reasoning_text.delta" if delta.kind == "reasoning" else "response.output_text.delta"
        extra = {} if delta.kind == "reasoning" else {"logprobs": []}
        return [self._event(kind, **where, content_index=0, delta=delta.text, **extra)]

    def _close(self) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.response["output"].index(item)}
        if item["type"] == "function_call":
            item["status"] = "completed"
            events = [self._event("response.function_call_arguments.done", **where, arguments=item["arguments"],
                                  name=item["name"])]  # fmt: skip
        else:
            if item["type"] == "message":
                item["status"] = "completed"
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            events = [self._event(done, **where, content_index=0, text=part["text"], **extra),
                      self._event("response.content_part.done", **where, content_index=0, part=_copy(part))]  # fmt: skip
        return events + [self._event("response.output_item.done", output_index=where["output_index"], item=_copy(item))]


def _copy(item: dict) -> dict:
    return {key: [dict(part) for part in value] if isinstance(value, list) else value for key, value in item.items()}


def prometheus(loop) -> str:
    """The engine's counters in Prometheus' text format."""
    m, batcher = loop.metrics, loop.batcher
    ttft = sorted(m.time_to_first_token)
    lines = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP gptoss_{name} {help_text}", f"# TYPE gptoss_{name} {kind}", f"gptoss_{name} {value}"])

    metric("requests_total", "counter", "Requests accepted.", m.requests)
    metric("requests_refused_total", "counter", "Requests refused with 429 (queue full).", m.refused)
    metric("requests_cancelled_total", "counter", "Requests cancelled (client gone, stop string).", m.cancelled)
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", m.prompt_tokens)
    metric("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens)
    metric("engine_steps_total", "counter", "Scheduling steps of the engine.", m.steps)
    metric("requests_in_flight", "gauge", "Requests queued or in a slot.", loop.in_flight)
    metric("queue_depth", "gauge", "Requests waiting for a slot.", max(0, loop.in_flight - batcher.busy_slots))
    metric("slots_busy", "gauge", "Slots holding a request.", batcher.busy_slots)
    metric("slots", "gauge", "Slots of the KV cache.", batcher.slots)
    for quantile in (0.5, 0.99):
        value = ttft[min(len(ttft) - 1, int(quantile * len(ttft)))] if ttft else float("nan")
        metric(f"time_to_first_token_seconds_p{int(quantile * 100)}", "gauge",
               f"Time to first token, {int(quantile * 100)}th percentile of the latest requests.", value)  # fmt: skip
    return "\n".join(lines) + "\n"
