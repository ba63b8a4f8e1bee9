"""Chat with a model in the harmony format: render, generate, parse; batched replies or a streamed one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

from gptoss_jax.chat import harmony
from gptoss_jax.chat.answers import final_answer
from gptoss_jax.chat.harmony import ChatMessage
from gptoss_jax.inference.engine import Generator
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.nn import GptOss


@dataclasses.dataclass
class ChatReply:
    """One assistant turn: the parsed messages, the final answer and the reasoning apart, and the raw tokens.

    `final` is what to show: the final channel, or the raw text of output that was not harmony.
    """

    messages: list[ChatMessage]
    final: str
    analysis: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class ChatDelta:
    """A piece of text as it streams; channel is "analysis", "commentary", "final", or None for raw text."""

    channel: str | None
    text: str


class Chat:
    """Harmony chat over a model. Keeps the compiled generator and the vocabulary across calls."""

    def __init__(
        self,
        model: GptOss,
        *,
        reasoning_effort: str = "medium",
        system: str | None = None,
        developer: str | None = None,
        tools: list[dict] | None = None,
        encoding=None,
        generator: Generator | None = None,
    ):
        harmony.check_reasoning_effort(reasoning_effort)
        self.model = model
        self.encoding = encoding or harmony.load_encoding(model.checkpoint_dir)
        self.generator = generator or Generator(model)
        self.reasoning_effort = reasoning_effort
        self.system = system
        self.developer = developer
        self.tools = tools

    def render(self, conversation: Sequence[ChatMessage]) -> list[int]:
        """Prompt tokens for the next assistant turn of `conversation`."""
        return harmony.render_chat(
            self.encoding,
            list(conversation),
            reasoning_effort=self.reasoning_effort,
            system=self.system,
            developer=self.developer,
            tools=self.tools,
        )

    def reply(
        self,
        conversations: Sequence[Sequence[ChatMessage] | str],
        *,
        max_new_tokens: int = 1024,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
    ) -> list[ChatReply]:
        """The next assistant turn of each conversation (a str is one user message), generated as one batch."""
        prompts = [self.render(_as_conversation(conversation)) for conversation in conversations]
        completions = self.generator.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            seed=seed,
            stop_tokens=harmony.stop_tokens(self.encoding),
        )
        return [
            self._reply(completion.tokens, completion.logprobs, completion.finish_reason, len(prompt))
            for prompt, completion in zip(prompts, completions)
        ]

    def stream(
        self,
        conversation: Sequence[ChatMessage] | str,
        *,
        max_new_tokens: int = 1024,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
    ) -> Iterator[ChatDelta | ChatReply]:
        """Yield ChatDelta text pieces as tokens arrive, then the whole ChatReply last."""
        prompt = self.render(_as_conversation(conversation))
        stops = harmony.stop_tokens(self.encoding)
        decoder = harmony.StreamDecoder(self.encoding)
        tokens: list[int] = []
        logprobs: list[float] = []
        for event in self.generator.stream(
            [prompt], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_tokens=stops
        ):
            tokens.append(event.token)
            logprobs.append(event.logprob)
            for channel, text in decoder.push(event.token):
                yield ChatDelta(channel, text)
        for channel, text in decoder.finish():
            yield ChatDelta(channel, text)
        finish_reason = "stop" if tokens and tokens[-1] in stops else "length"
        yield self._reply(tokens, logprobs, finish_reason, len(prompt))

    def _reply(self, tokens: list[int], logprobs: list[float], finish_reason: str, prompt_tokens: int) -> ChatReply:
        messages = harmony.parse_completion(self.encoding, tokens)
        return ChatReply(
            messages=messages,
            final=final_answer(messages, raw_text=True) or "",
            analysis=harmony.analysis_text(messages),
            tokens=tokens,
            logprobs=logprobs,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
        )


def _as_conversation(conversation: Sequence[ChatMessage] | str) -> list[ChatMessage]:
    return [ChatMessage("user", conversation)] if isinstance(conversation, str) else list(conversation)


def chat(
    model: GptOss,
    prompts: Sequence[str],
    *,
    reasoning_effort: str = "medium",
    developer: str | None = None,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
) -> list[ChatReply]:
    """One assistant reply per user prompt, generated as a batch (see `Chat` for multi-turn and streaming)."""
    encoding = harmony.load_encoding(checkpoint_dir or model.checkpoint_dir)
    session = Chat(model, reasoning_effort=reasoning_effort, developer=developer, encoding=encoding)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return session.reply(list(prompts), max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
