"""The harmony chat format: a thin layer over OpenAI's `openai-harmony` (rendering, parsing, streaming).

openai-harmony does the work; this module finds the o200k vocabulary offline, converts plain
`ChatMessage`s to and from harmony messages, and never lets malformed model output raise.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import openai_harmony as oh

from gptoss_jax.errors import GptOssError

VOCAB_FILE = "o200k_base.tiktoken"
ENV_VAR = "TIKTOKEN_ENCODINGS_BASE"
REASONING_EFFORTS = ("low", "medium", "high")
_EFFORT = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
# A real header (channel, recipient, content type) is a handful of tokens; the streaming parser stays in
# its header state forever on text that is not harmony, so past this many we treat the output as raw.
_MAX_HEADER_TOKENS = 64

_lock = threading.Lock()  # guards the cache and the temporary change of os.environ below
_cache: dict[tuple[str, str], oh.HarmonyEncoding] = {}


class HarmonyError(GptOssError):
    """The harmony vocabulary cannot be found or loaded."""


def load_encoding(checkpoint_dir: str | Path | None = None) -> oh.HarmonyEncoding:
    """The gpt-oss encoding; vocabulary from $TIKTOKEN_ENCODINGS_BASE, else the checkpoint folder, else a download."""
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        source = ("env", str(Path(env_dir).resolve()))
    elif checkpoint_dir is not None and (Path(checkpoint_dir) / VOCAB_FILE).is_file():
        source = ("checkpoint", str(Path(checkpoint_dir).resolve()))
    else:
        source = ("download", "")
    with _lock:
        if source not in _cache:
            _cache[source] = _load(*source)
        return _cache[source]


def _load(kind: str, folder: str) -> oh.HarmonyEncoding:
    # harmony reads TIKTOKEN_ENCODINGS_BASE only while loading (the vocabulary then lives in memory), so
    # the checkpoint folder is passed through the variable for the duration of the load and then restored.
    saved = os.environ.get(ENV_VAR)
    if kind == "checkpoint":
        os.environ[ENV_VAR] = folder
    elif kind == "download":
        os.environ.pop(ENV_VAR, None)  # an empty value would still be read as a folder (the current one)
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # harmony's own HarmonyError (missing file, hash mismatch, failed download)
        where = {"env": f"{ENV_VAR}={folder}", "checkpoint": f"{folder}/{VOCAB_FILE}", "download": "download"}[kind]
        reason = " ".join(str(e).split())
        raise HarmonyError(
            f"cannot load the o200k_base vocabulary ({where}: {reason}); set {ENV_VAR} to a folder holding "
            f"{VOCAB_FILE}, put {VOCAB_FILE} next to the checkpoint, or allow the download "
            "from openaipublic.blob.core.windows.net"
        ) from None
    finally:
        if kind != "env":
            if saved is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = saved


# Where vocabulary_file looks, for error messages.
WHERE = f"${ENV_VAR}/{VOCAB_FILE}, {VOCAB_FILE} next to the checkpoint, or the bpe-openai package"


def vocabulary_file(checkpoint_dir: str | Path | None = None) -> Path | None:
    """The o200k_base vocabulary file on this machine (plain or gzipped), looked for as `load_encoding` does
    and then in bpe-openai (which ships it); None where there is none (harmony would download it)."""
    folders = [os.environ.get(ENV_VAR), checkpoint_dir]
    for folder in folders:
        if folder and (Path(folder) / VOCAB_FILE).is_file():
            return Path(folder) / VOCAB_FILE
    try:
        import bpe_openai
    except ImportError:
        return None
    packed = Path(bpe_openai.__file__).parent / "data" / f"{VOCAB_FILE}.gz"
    return packed if packed.is_file() else None


def check_reasoning_effort(effort: str, name: str = "reasoning_effort") -> str:
    """`effort` if it is one the system message takes; else a ValueError naming `name` and the choices."""
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"{name} must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    return effort


@dataclass
class ChatMessage:
    """One message. `name` is a tool message's author, e.g. "functions.get_weather"."""

    role: str  # "system" | "developer" | "user" | "assistant" | "tool"
    content: str
    channel: str | None = None  # "analysis" | "commentary" | "final"
    recipient: str | None = None  # e.g. "functions.get_weather" for a tool call
    content_type: str | None = None  # e.g. "<|constrain|>json"
    name: str | None = None


def render_chat(
    encoding: oh.HarmonyEncoding,
    messages: list[ChatMessage],
    *,
    reasoning_effort: str = "medium",
    system: str | None = None,
    developer: str | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """Prompt tokens for the next assistant turn: system, optional developer (instructions, tools), messages.

    An assistant message without a channel is an earlier final answer. A tool message answers the latest
    tool call: its name defaults to that call's recipient, its recipient to "assistant", its channel to
    "commentary". `tools` are {"name", "description", "parameters": JSON schema} (or OpenAI's
    {"type": "function", "function": {...}}).
    """
    conversation = _conversation(messages, reasoning_effort, system, developer, tools)
    return encoding.render_conversation_for_completion(oh.Conversation.from_messages(conversation), oh.Role.ASSISTANT)


# An assistant message renders as <|start|>assistant then what the model itself writes.
_ASSISTANT_HEADER_TOKENS = 2


def render_training(
    encoding: oh.HarmonyEncoding,
    messages: list[ChatMessage],
    *,
    reasoning_effort: str = "medium",
    system: str | None = None,
    developer: str | None = None,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[bool]]:
    """A whole conversation as training tokens, and per token whether the model is trained to write it.

    Rendered with openai-harmony's training rendering (the last assistant message ends in <|return|>, or
    <|call|> for a tool call). As at inference, the analysis of turns before the latest user message is
    dropped. Learned tokens: each assistant message after its `<|start|>assistant` header.
    """
    conversation = _conversation(messages, reasoning_effort, system, developer, tools)
    users = [i for i, m in enumerate(conversation) if m.author.role == oh.Role.USER]
    last_user = users[-1] if users else 0
    kept = [m for i, m in enumerate(conversation) if not (i < last_user and m.channel == "analysis")]
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    tokens = encoding.render_conversation_for_training(oh.Conversation.from_messages(kept), config)
    learned: list[bool] = []
    for m in kept:
        length = len(encoding.render(m))
        header = _ASSISTANT_HEADER_TOKENS if m.author.role == oh.Role.ASSISTANT else length
        learned += [False] * header + [True] * (length - header)
    if len(learned) != len(tokens):  # the training rendering is the messages' renderings end to end
        raise HarmonyError(f"harmony rendered {len(tokens)} tokens for messages of {len(learned)} tokens")
    return tokens, learned


def _conversation(
    messages: list[ChatMessage],
    reasoning_effort: str,
    system: str | None,
    developer: str | None,
    tools: list[dict] | None,
) -> list[oh.Message]:
    """harmony messages: system (reasoning effort, identity), optional developer, then `messages`."""
    system_content = oh.SystemContent.new().with_reasoning_effort(_EFFORT[check_reasoning_effort(reasoning_effort)])
    if system is not None:
        system_content = system_content.with_model_identity(system)
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system_content)]
    if developer is not None or tools:
        dev = oh.DeveloperContent.new()
        if developer is not None:
            dev = dev.with_instructions(developer)
        if tools:
            dev = dev.with_function_tools([_tool(t) for t in tools])
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))

    last_call = None
    for m in messages:
        channel, recipient, name = m.channel, m.recipient, m.name
        if m.role == "assistant":
            channel = channel or "final"
            last_call = recipient or last_call
        elif m.role == "tool":
            name = name or last_call
            if name is None:
                raise ValueError("a tool message needs name= (e.g. 'functions.get_weather') or an earlier tool call")
            channel, recipient = channel or "commentary", recipient or "assistant"
        author = oh.Author(role=oh.Role(m.role), name=name)
        msg = oh.Message.from_author_and_content(author, m.content)
        msg.channel, msg.recipient, msg.content_type = channel, recipient, m.content_type
        out.append(msg)
    return out


def _tool(spec: dict) -> oh.ToolDescription:
    spec = spec.get("function", spec)
    return oh.ToolDescription.new(spec["name"], spec.get("description", ""), spec.get("parameters"))


def stop_tokens(encoding: oh.HarmonyEncoding) -> list[int]:
    """The tokens that end an assistant turn: <|return|> (200002) and <|call|> (200012)."""
    return sorted(encoding.stop_tokens_for_assistant_actions())


def _from_harmony(m: oh.Message) -> ChatMessage:
    text = "".join(c.text for c in m.content if isinstance(c, oh.TextContent))
    return ChatMessage(m.author.role.value, text, m.channel, m.recipient, m.content_type, m.author.name)


def decode_text(encoding: oh.HarmonyEncoding, tokens: list[int]) -> str:
    """Text of any tokens, special ones spelled out; ids outside the vocabulary are dropped, not raised on."""
    try:
        return encoding.decode(tokens)
    except Exception:
        return encoding.decode([t for t in tokens if _decodable(encoding, t)])


def _decodable(encoding: oh.HarmonyEncoding, token: int) -> bool:
    try:
        encoding.decode([token])
        return True
    except Exception:
        return False


def parse_completion(encoding: oh.HarmonyEncoding, tokens: list[int]) -> list[ChatMessage]:
    """The assistant messages in generated tokens; output that is not harmony becomes one raw-text message."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        return []
    try:
        return [_from_harmony(m) for m in encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)]
    except Exception:  # a model can emit anything; a chat loop must still get its text
        return [ChatMessage("assistant", decode_text(encoding, tokens))]


def analysis_text(messages: list[ChatMessage]) -> str:
    """The reasoning: analysis-channel messages."""
    return "".join(m.content for m in messages if m.channel == "analysis")


class StreamDecoder:
    """Token-by-token parsing of an assistant turn into (channel, text delta) pairs; never raises."""

    def __init__(self, encoding: oh.HarmonyEncoding):
        self._encoding = encoding
        self._parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
        self._unshown: list[int] = []  # tokens not yet shown as text (a header, a split UTF-8 character)
        self._raw: str | None = None  # the raw text once the output stopped being harmony
        self._pending: list[int] = []  # raw-mode tokens that may end inside a UTF-8 character

    def push(self, token: int) -> list[tuple[str | None, str]]:
        """Feed one generated token; returns the text it adds, with the channel it belongs to."""
        token = int(token)
        if self._raw is not None:
            return self._raw_push([token])
        self._unshown.append(token)
        try:
            self._parser.process(token)
        except Exception:
            return self._to_raw()
        delta = self._parser.last_content_delta
        if delta or self._parser.state == oh.StreamState.EXPECT_START:  # shown, or a message ended
            self._unshown = []
        if len(self._unshown) > _MAX_HEADER_TOKENS:
            return self._to_raw()
        return [(self._parser.current_channel, delta)] if delta else []

    def finish(self) -> list[tuple[str | None, str]]:
        """End of generation: closes an unterminated message and returns any text still held back."""
        if self._raw is None:
            try:
                self._parser.process_eos()
                return []
            except Exception:  # stopped inside a header: show it as raw text
                return self._to_raw(final=True)
        return self._raw_push([], final=True)

    @property
    def recipient(self) -> str | None:
        """Who the message in progress is addressed to (e.g. "functions.get_weather" for a tool call)."""
        return None if self._raw is not None else self._parser.current_recipient

    @property
    def finished_messages(self) -> int:
        """How many messages have ended so far."""
        return len(self._parser.messages)

    @property
    def messages(self) -> list[ChatMessage]:
        """The messages so far, the one in progress (or the raw text) last."""
        done = [_from_harmony(m) for m in self._parser.messages]
        if self._raw is not None:
            return done + [ChatMessage("assistant", self._raw)]
        p = self._parser
        if p.state == oh.StreamState.CONTENT and p.current_content:
            role = p.current_role.value if p.current_role else "assistant"
            done.append(ChatMessage(role, p.current_content, p.current_channel, p.current_recipient, p.current_content_type))
        return done

    def _to_raw(self, final: bool = False) -> list[tuple[str | None, str]]:
        self._raw, tokens, self._unshown = "", self._unshown, []
        return self._raw_push(tokens, final)

    def _raw_push(self, tokens: list[int], final: bool = False) -> list[tuple[str | None, str]]:
        self._pending += tokens
        text = decode_text(self._encoding, self._pending)
        # A trailing U+FFFD may be a character split across tokens (at most 4 bytes): wait for the rest.
        if not final and text.endswith("\ufffd") and len(self._pending) < 4:
            return []
        self._pending = []
        self._raw += text
        return [(None, text)] if text else []
