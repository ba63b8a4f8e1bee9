"""The OpenAI-compatible server, live on a port, driven by OpenAI's own Python client.

The random model's output is gibberish, so what the parser must read (reasoning, tool calls, final
answers) is put through the engine with its test hook: the hook gives the tokens to emit for a prompt
holding a marker, written here with openai-harmony's own renderer.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import openai_harmony as oh
import pytest
import uvicorn

import gptoss_jax
from cli_errors import assert_one_line_error
from gptoss_jax.chat.harmony import load_encoding
from gptoss_jax.inference.batching import Batcher
from gptoss_jax.serving.app import create_app

MODEL = "gpt-oss-tiny"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CALL = 200012  # <|call|>


class Script:
    """The test hook: prompts whose text holds a marker get that marker's tokens; others sample."""

    def __init__(self, encoding):
        self.encoding, self.outputs, self.prompts = encoding, {}, []

    def __call__(self, prompt: list[int]) -> list[int] | None:
        text = self.encoding.decode(prompt)
        self.prompts.append(text)
        # The latest marker in the prompt wins: a follow-up turn repeats earlier turns' markers.
        found = [(text.rfind(marker), tokens) for marker, tokens in self.outputs.items() if marker in text]
        return max(found)[1] if found else None

    def assistant(self, *messages: oh.Message) -> list[int]:
        """Completion tokens for assistant messages, as the model writes them after `<|start|>assistant`."""
        tokens = []
        for message in messages:
            tokens += self.encoding.render(message)
        tokens = tokens[2:]  # the prompt already ends in <|start|>assistant
        if messages[-1].recipient:
            tokens[-1] = CALL  # a tool call ends in <|call|>, not <|end|>
        else:
            tokens[-1] = 200002  # the turn's end: <|return|>
        return tokens


def message(channel: str, text: str, recipient: str | None = None) -> oh.Message:
    msg = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        msg = msg.with_recipient(recipient).with_content_type("<|constrain|>json")
    return msg


class Server:
    def __init__(self, app, script):
        self.app, self.script = app, script
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="test", max_retries=0)
        self.batcher = app.state.loop.batcher

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"gptoss_{name} ")))

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start(checkpoint, slots, max_queue, **options) -> Server:
    encoding = load_encoding(checkpoint)
    model = gptoss_jax.load(checkpoint, dtype="float32")
    script = Script(encoding)
    batcher = Batcher(model, slots=slots, context=384, prefill_chunk=128)
    return Server(create_app(batcher, encoding, MODEL, max_queue=max_queue, forced_output=script, **options), script)


@pytest.fixture(scope="module")
def server(harmony_checkpoint, harmony_vocab_dir):
    server = start(harmony_checkpoint, slots=4, max_queue=64)
    yield server
    server.stop()


def ask(server, content: str, **options):
    return server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **options
    )


def test_chat_reasoning_content_and_usage(server):
    script = server.script
    script.outputs["[reason]"] = tokens = script.assistant(message("analysis", "The user greets."),
                                                           message("final", "Hello there!"))  # fmt: skip
    reply = ask(server, "hi [reason]", max_tokens=64)
    choice = reply.choices[0]
    assert choice.message.content == "Hello there!" and choice.finish_reason == "stop"
    assert choice.message.reasoning == choice.message.reasoning_content == "The user greets."
    # The prompt as openai-harmony renders the same conversation; the reply as the tokens emitted.
    conversation = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)),
        oh.Message.from_role_and_content(oh.Role.USER, "hi [reason]"),
    ])  # fmt: skip
    prompt = script.encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(tokens))
    assert reply.usage.total_tokens == len(prompt) + len(tokens)

    # A later turn: the earlier reply's reasoning is dropped from the prompt (harmony's rule), its answer kept.
    server.client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": "hi [reason]"},
        {"role": "assistant", "content": "Hello there!", "reasoning": "The user greets."},
        {"role": "user", "content": "and now?"},
    ])  # fmt: skip
    assert "Hello there!" in script.prompts[-1] and "The user greets." not in script.prompts[-1]

    stream = ask(server, "hi [reason]", max_tokens=64, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "The user greets."
    assert "".join(d.content or "" for d in deltas) == "Hello there!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_tool_call_round_trip(server):
    script = server.script
    arguments = '{"city":"Paris"}'
    script.outputs["[weather]"] = script.assistant(message("analysis", "Need the weather."),
                                                   message("commentary", arguments, "functions.get_weather"))  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Paris? [weather]"}]
    reply = server.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning == "Need the weather."
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", arguments)
    assert "get_weather" in script.prompts[-1]  # the tool was declared to the model

    # Streamed: the call's id and name in one delta, its arguments in the following ones.
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                        temperature=0, stream=True))  # fmt: skip
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert "".join(tc.function.arguments or "" for tc in calls) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The tool's answer goes back; the model's next turn reads it.
    script.outputs["sunny, 21C"] = script.assistant(message("final", "It is sunny in Paris."))
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]  # fmt: skip
    answer = server.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert answer.choices[0].message.content == "It is sunny in Paris."
    prompt = script.prompts[-1]
    assert "to=functions.get_weather" in prompt and "<|start|>functions.get_weather to=assistant" in prompt
    assert "sunny, 21C" in prompt and "Need the weather." not in prompt.split("sunny, 21C")[1]


def test_responses_api(server):
    script = server.script
    script.outputs["[resp]"] = script.assistant(message("analysis", "Think."), message("final", "Answer."))
    response = server.client.responses.create(model=MODEL, input="question [resp]", instructions="Be brief.",
                                              reasoning={"effort": "low"}, temperature=0)  # fmt: skip
    assert response.status == "completed" and response.output_text == "Answer."
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "Think."
    assert "Be brief." in script.prompts[-1] and "Reasoning: low" in script.prompts[-1]

    events = list(server.client.responses.create(model=MODEL, input="question [resp]", temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert (thought, text) == ("Think.", "Answer.")
    assert [e.sequence_number for e in events] == list(range(len(events)))

    # A function call and its output, in the Responses API's items.
    script.outputs["[fn]"] = script.assistant(message("commentary", '{"city":"Oslo"}', "functions.get_weather"))
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    first = server.client.responses.create(model=MODEL, input="weather [fn]", tools=[tool], temperature=0)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Oslo"}')
    script.outputs["cold, -3C"] = script.assistant(message("final", "Cold in Oslo."))
    second = server.client.responses.create(
        model=MODEL, tools=[tool], temperature=0,
        input=[{"role": "user", "content": "weather [fn]"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "cold, -3C"}],
    )  # fmt: skip
    assert second.output_text == "Cold in Oslo."


def test_n_choices_and_raw_completions(server):
    reply = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "pick"}],
                                                  n=3, max_tokens=6, temperature=1.0, seed=5)  # fmt: skip
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 18  # 6 tokens each, no stop among random tokens this short
    texts = {choice.message.content for choice in reply.choices}
    assert len(texts) > 1  # different seeds, different samples
    raw = server.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert raw.usage.completion_tokens == 5 and raw.choices[0].finish_reason == "length"
    assert raw.usage.prompt_tokens == len(server.script.encoding.encode("Once upon a time", allowed_special="all"))


def test_sixty_four_concurrent_streams_each_equal_alone(server):
    requests = [(f"request {i}: " + "word " * (i % 13), 4 + (i * 7) % 29) for i in range(64)]

    async def streamed():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)

        async def one(content, max_tokens):
            text, finish = "", None
            stream = await client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens, stream=True,
                                                          messages=[{"role": "user", "content": content}])  # fmt: skip
            async for chunk in stream:
                delta = chunk.choices[0].delta
                text += (getattr(delta, "reasoning", None) or "") + (delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        return await asyncio.gather(*(one(*request) for request in requests))

    together = asyncio.run(streamed())
    assert len(together) == 64 and all(finish in ("stop", "length") for _, finish in together)
    for (content, max_tokens), (text, finish) in zip(requests, together):
        alone = ask(server, content, max_tokens=max_tokens).choices[0]
        assert ((getattr(alone.message, "reasoning", None) or "") + (alone.message.content or ""), alone.finish_reason) == (text, finish)
    assert server.metric("requests_in_flight") == 0


def test_a_client_that_leaves_frees_its_slot(server):
    cancelled = server.metric("requests_cancelled_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 300, "stream": True,
        "temperature": 0,
    }) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("slots_busy") == 1
    deadline = time.time() + 20
    while server.metric("slots_busy") and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("slots_busy") == 0 and server.metric("requests_cancelled_total") == cancelled + 1
    assert ask(server, "after", max_tokens=3).choices[0].finish_reason == "length"


def test_errors_are_openai_json(server):
    client, url = server.client, server.url
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context is 384 tokens") as error:
        ask(server, "x", max_tokens=1000)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.post(url + "/v1/chat/completions", json={"model": MODEL})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [MODEL]
    # A fault inside the engine (here the test hook hands it a token that is not one) fails that request
    # with a 500 and the engine goes on serving.
    server.script.outputs["[boom]"] = ["not a token"]
    with pytest.raises(openai.InternalServerError, match="engine failed"):
        ask(server, "[boom]", max_tokens=4)
    with pytest.raises(openai.InternalServerError, match="engine failed"):
        ask(server, "[boom]", max_tokens=4, n=2)
    with pytest.raises(openai.APIError):  # streamed: the failure ends the stream
        list(ask(server, "[boom]", max_tokens=4, n=2, stream=True))
    assert ask(server, "still fine", max_tokens=2).usage.completion_tokens == 2


def test_full_queue_answers_429_then_serves(harmony_checkpoint, harmony_vocab_dir):
    server = start(harmony_checkpoint, slots=1, max_queue=1, api_key="secret")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)

        async def burst():
            async def one(i):
                try:
                    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                         max_tokens=200, temperature=0)  # fmt: skip
                    return "ok"
                except openai.RateLimitError as error:
                    assert error.response.headers["retry-after"] == "1"
                    return "429"

            return await asyncio.gather(*(one(i) for i in range(4)))

        outcomes = asyncio.run(burst())
        assert outcomes.count("ok") == 2 and outcomes.count("429") == 2  # one slot + one queued
        served = openai.OpenAI(base_url=server.url + "/v1", api_key="secret").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=3, temperature=0)  # fmt: skip
        assert served.usage.completion_tokens == 3
        assert server.metric("requests_refused_total") == 2
        # The one slot, taken by a long stream whose client leaves: the next request gets the slot.
        headers = {"authorization": "Bearer secret"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 300, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        started = server.metric("engine_steps_total")
        reply = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "mine"}], "max_tokens": 3, "temperature": 0})
        assert reply.json()["usage"]["completion_tokens"] == 3 and server.metric("requests_cancelled_total") == 1
        assert server.metric("engine_steps_total") - started < 100  # it did not wait out the 300-token stream
    finally:
        server.stop()


def test_the_command_serves_a_random_model_and_refuses_bad_options(tmp_path, harmony_vocab_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "eval.serve", "--checkpoint", "random", "--port", str(port), "--slots", "2",
               "--context", "256", "--dtype", "float32"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None and time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [model.id for model in client.models.list()] == ["gpt-oss-random"]
        reply = client.chat.completions.create(model="gpt-oss-random", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0)  # fmt: skip
        assert reply.usage.completion_tokens == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "eval.serve", "--checkpoint", "random", "--slots", "0"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_one_line_error(bad, "--slots must be at least 1")
