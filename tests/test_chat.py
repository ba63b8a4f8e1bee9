"""The chat helper: harmony rendering + generation + parsing, batched and streamed."""

from __future__ import annotations

import pytest

import gptoss_jax
from gptoss_jax.chat import Chat, ChatDelta, ChatReply, chat
from gptoss_jax.chat.harmony import ChatMessage
from gptoss_jax.inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def session(harmony_checkpoint, harmony_vocab_dir):
    return Chat(gptoss_jax.load(harmony_checkpoint, dtype="float32"), reasoning_effort="low")


def test_a_batch_of_conversations_replies_as_each_would_alone(session):
    conversations = [
        "What is 2 + 2?",
        [
            ChatMessage("user", "Name a colour."),
            ChatMessage("assistant", "Blue.", channel="final"),
            ChatMessage("user", "Another one?"),
        ],
    ]
    together = session.reply(conversations, max_new_tokens=10, sampling=GREEDY)
    for conversation, reply in zip(conversations, together):
        alone = session.reply([conversation], max_new_tokens=10, sampling=GREEDY)[0]
        assert reply.tokens == alone.tokens
        messages = [ChatMessage("user", conversation)] if isinstance(conversation, str) else conversation
        assert reply.prompt_tokens == len(session.render(messages))


@pytest.mark.quick
def test_streaming_yields_text_then_the_reply_it_adds_up_to(session):
    pieces = list(session.stream("Tell me a story.", max_new_tokens=10, sampling=GREEDY))
    *deltas, reply = pieces
    assert isinstance(reply, ChatReply) and all(isinstance(delta, ChatDelta) for delta in deltas)
    assert reply.tokens == session.reply(["Tell me a story."], max_new_tokens=10, sampling=GREEDY)[0].tokens
    assert "".join(delta.text for delta in deltas) == "".join(message.content for message in reply.messages)


def test_the_chat_function_uses_the_reasoning_effort_and_sampling_it_is_given(session):
    replies = chat(session.model, ["hi", "hello"], reasoning_effort="high", max_new_tokens=3, temperature=0)
    high = Chat(session.model, reasoning_effort="high", encoding=session.encoding)
    assert [reply.tokens for reply in replies] == [
        reply.tokens for reply in high.reply(["hi", "hello"], max_new_tokens=3, sampling=GREEDY)
    ]
    rendered = session.encoding.decode(high.render([ChatMessage("user", "hi")]))
    assert "Reasoning: high" in rendered


@pytest.mark.quick
def test_an_unknown_reasoning_effort_is_refused(session):
    with pytest.raises(ValueError, match="low, medium, high"):
        Chat(session.model, reasoning_effort="extreme", encoding=session.encoding)
