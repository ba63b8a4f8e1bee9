"""gptoss_jax.chat.harmony: rendering and parsing match openai-harmony, the vocabulary loads offline, bad output never raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import defaultdict

import numpy as np
import openai_harmony as oh
import pytest
from harmony_vocab import VOCAB_FILE, write_vocab

from gptoss_jax.chat.answers import final_answer
from gptoss_jax.chat.harmony import (
    REASONING_EFFORTS,
    ChatMessage,
    HarmonyError,
    StreamDecoder,
    analysis_text,
    load_encoding,
    parse_completion,
    render_chat,
    stop_tokens,
)
from gptoss_jax.errors import GptOssError

pytestmark = pytest.mark.quick  # the day-to-day tier (scripts/test.sh -m quick)

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
COMPLETION = (
    "<|channel|>analysis<|message|>The user wants the weather; call the tool.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    "<|start|>assistant<|channel|>final<|message|>It is 20 °C in Paris 🎉.<|return|>"
)


@pytest.fixture(scope="module")
def enc(harmony_vocab_dir):
    return load_encoding()


def encode(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def offline_env(tmp_path) -> dict[str, str]:
    """A subprocess environment with no TIKTOKEN_ENCODINGS_BASE, an empty download cache and no network."""
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE" and "proxy" not in k.lower()}
    (tmp_path / "empty_cache").mkdir()
    env["TIKTOKEN_RS_CACHE_DIR"] = str(tmp_path / "empty_cache")
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        env[var] = "http://127.0.0.1:9"  # nothing listens there: any download fails at once
    return env


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)


def test_render_chat_equals_openai_harmonys_own_rendering_of_a_multi_turn_tool_conversation(enc):
    messages = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "I should call get_weather.", channel="analysis"),
        ChatMessage("assistant", '{"city": "Paris"}', "commentary", "functions.get_weather", "<|constrain|>json"),
        ChatMessage("tool", '{"temp_c": 20}'),
        ChatMessage("assistant", "It is 20 °C.", channel="final"),
        ChatMessage("user", "And tomorrow?"),
    ]
    ours = render_chat(enc, messages, reasoning_effort="high", developer="Answer briefly.", tools=[WEATHER])

    R = oh.Role
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH)
    tool = oh.ToolDescription.new(WEATHER["name"], WEATHER["description"], WEATHER["parameters"])
    developer = oh.DeveloperContent.new().with_instructions("Answer briefly.").with_function_tools([tool])
    conversation = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(R.SYSTEM, system),
        oh.Message.from_role_and_content(R.DEVELOPER, developer),
        oh.Message.from_role_and_content(R.USER, "Weather in Paris?"),
        oh.Message.from_role_and_content(R.ASSISTANT, "I should call get_weather.").with_channel("analysis"),
        oh.Message.from_role_and_content(R.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(oh.Author.new(R.TOOL, "functions.get_weather"), '{"temp_c": 20}')
        .with_channel("commentary").with_recipient("assistant"),
        oh.Message.from_role_and_content(R.ASSISTANT, "It is 20 °C.").with_channel("final"),
        oh.Message.from_role_and_content(R.USER, "And tomorrow?"),
    ])
    assert ours == enc.render_conversation_for_completion(conversation, R.ASSISTANT)
    text = enc.decode(ours)
    assert "Reasoning: high" in text and "# Instructions\n\nAnswer briefly." in text and "type get_weather" in text
    assert text.endswith("<|start|>user<|message|>And tomorrow?<|end|><|start|>assistant")


def test_reasoning_effort_and_model_identity_land_in_the_system_message(enc):
    for effort in REASONING_EFFORTS:
        text = enc.decode(render_chat(enc, [ChatMessage("user", "Hi")], reasoning_effort=effort))
        assert f"Reasoning: {effort}" in text
        assert text.startswith("<|start|>system<|message|>You are ChatGPT")
        assert "<|start|>developer" not in text
    text = enc.decode(render_chat(enc, [ChatMessage("user", "Hi")], system="You are a test model."))
    assert text.startswith("<|start|>system<|message|>You are a test model.\n")


def test_an_earlier_assistant_answer_without_a_channel_renders_on_the_final_channel(enc):
    messages = [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "Bye")]
    text = enc.decode(render_chat(enc, messages))
    assert "<|start|>assistant<|channel|>final<|message|>Hello!<|end|><|start|>user" in text


def test_special_token_ids_and_stop_tokens_match_the_spec(enc):
    spec = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
            "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012}
    assert {s: encode(enc, s) for s in spec} == {s: [i] for s, i in spec.items()}
    assert stop_tokens(enc) == [200002, 200012]
    prompt = render_chat(enc, [ChatMessage("user", "Hi")])
    assert prompt[:1] == [200006] and 200008 in prompt and prompt[-2:] == encode(enc, "<|start|>assistant")


def test_unknown_reasoning_effort_raises_value_error_naming_the_allowed_values(enc):
    with pytest.raises(ValueError, match="low, medium, high"):
        render_chat(enc, [ChatMessage("user", "Hi")], reasoning_effort="extreme")


def test_a_tool_message_with_no_name_and_no_earlier_call_raises_value_error(enc):
    with pytest.raises(ValueError, match="tool message"):
        render_chat(enc, [ChatMessage("user", "Hi"), ChatMessage("tool", "{}")])


def test_parse_completion_gives_analysis_tool_call_and_final_messages(enc):
    messages = parse_completion(enc, np.array(encode(enc, COMPLETION), dtype=np.int32))
    assert messages == [
        ChatMessage("assistant", "The user wants the weather; call the tool.", "analysis"),
        ChatMessage("assistant", '{"city": "Paris"}', "commentary", "functions.get_weather", "<|constrain|>json"),
        ChatMessage("assistant", "It is 20 °C in Paris 🎉.", "final"),
    ]
    assert json.loads(messages[1].content) == {"city": "Paris"}
    assert final_answer(messages) == "It is 20 °C in Paris 🎉."
    assert analysis_text(messages) == "The user wants the weather; call the tool."


@pytest.mark.parametrize("kind", ["random ids", "truncated header", "plain text", "text after return", "ids outside the vocab"])
def test_parse_completion_falls_back_to_raw_text_on_malformed_output(enc, kind):
    tokens = {
        "random ids": np.random.default_rng(0).integers(0, 201088, size=50).tolist(),
        "truncated header": encode(enc, "<|channel|>fina"),
        "plain text": encode(enc, "Just some text."),
        "text after return": encode(enc, "<|channel|>final<|message|>Hi<|return|>trailing"),
        "ids outside the vocab": encode(enc, "Hello") + [250000, -1] + encode(enc, " world"),
    }[kind]
    messages = parse_completion(enc, tokens)
    assert len(messages) == 1 and messages[0].role == "assistant" and messages[0].channel is None
    if kind == "ids outside the vocab":
        assert messages[0].content == "Hello world"
    else:
        assert messages[0].content == enc.decode(tokens)
    assert final_answer(messages) is None  # not harmony: no answer to grade
    assert final_answer(messages, raw_text=True) == messages[0].content  # but a chat shows the text


def test_parse_completion_of_nothing_is_no_messages(enc):
    assert parse_completion(enc, []) == []


def stream(enc, tokens) -> tuple[list[tuple[str | None, str]], StreamDecoder]:
    decoder = StreamDecoder(enc)
    deltas = [d for t in tokens for d in decoder.push(t)]
    return deltas + decoder.finish(), decoder


def test_stream_decoder_deltas_concatenate_to_the_parsed_contents_per_channel(enc):
    tokens = encode(enc, COMPLETION)
    deltas, decoder = stream(enc, tokens)
    by_channel = defaultdict(str)
    for channel, text in deltas:
        by_channel[channel] += text
    parsed = parse_completion(enc, tokens)
    assert dict(by_channel) == {m.channel: m.content for m in parsed}
    assert decoder.messages == parsed


def test_stream_decoder_messages_include_the_message_in_progress(enc):
    decoder = StreamDecoder(enc)
    for t in encode(enc, "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Partial"):
        decoder.push(t)
    assert decoder.messages == [ChatMessage("assistant", "Hmm.", "analysis"), ChatMessage("assistant", "Partial", "final")]


@pytest.mark.parametrize(
    "kind", ["random ids", "truncated header", "header cut inside a character", "long plain text", "text after return"]
)
def test_stream_decoder_survives_garbage_and_yields_it_as_raw_text(enc, kind):
    tokens = {
        "random ids": np.random.default_rng(1).integers(0, 201088, size=200).tolist() + [250000],
        "truncated header": encode(enc, "<|channel|>fina"),
        "header cut inside a character": encode(enc, "<|channel|> 🎉")[:-1],
        "long plain text": encode(enc, "word " * 100),
        "text after return": encode(enc, "<|channel|>final<|message|>Hi<|return|> and trailing 🎉 text"),
    }[kind]
    deltas, decoder = stream(enc, tokens)
    raw = "".join(text for channel, text in deltas if channel is None)
    assert decoder.messages[-1] == ChatMessage("assistant", raw)
    if kind == "text after return":
        assert deltas[0] == ("final", "Hi") and raw == " and trailing 🎉 text"
    elif kind == "random ids":
        assert raw == enc.decode(tokens[:-1])
    else:
        assert raw == enc.decode(tokens)
    if kind == "long plain text":  # shown while streaming, not only at the end
        decoder = StreamDecoder(enc)
        assert any(decoder.push(t) for t in tokens)


def test_load_encoding_is_cached_per_source(enc):
    assert load_encoding() is enc


def test_load_encoding_reads_the_vocab_next_to_the_checkpoint_offline_and_restores_the_env(tmp_path):
    checkpoint = write_vocab(tmp_path / "gpt-oss-20b")
    result = run_python(f"""
        import os
        from gptoss_jax.chat.harmony import load_encoding
        enc = load_encoding({str(checkpoint)!r})
        assert enc.encode("hello world") == [24912, 2375], enc.encode("hello world")
        assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ
        print("ok")
    """, offline_env(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_load_encoding_with_no_source_raises_one_line_harmony_error_naming_the_options(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    result = run_python(f"""
        from gptoss_jax.errors import GptOssError
        from gptoss_jax.chat.harmony import HarmonyError, load_encoding
        try:
            load_encoding({str(tmp_path / "checkpoint")!r})
        except HarmonyError as e:
            assert isinstance(e, GptOssError)
            print(e)
        else:
            print("no error")
    """, offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert "set TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken" in lines[0]
    assert "put o200k_base.tiktoken next to the checkpoint" in lines[0] and "allow the download" in lines[0]


def test_a_tiktoken_encodings_base_without_the_file_raises_harmony_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(HarmonyError, match=f"TIKTOKEN_ENCODINGS_BASE={tmp_path}.*next to the checkpoint"):
        load_encoding()


def test_a_corrupt_vocab_next_to_the_checkpoint_raises_harmony_error_and_leaves_the_env_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    (tmp_path / VOCAB_FILE).write_text("aGVsbG8= 0\n")
    with pytest.raises(GptOssError, match="hash mismatch"):
        load_encoding(tmp_path)
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ
