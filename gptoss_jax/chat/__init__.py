"""Chat in the harmony format: `harmony` (render, parse, stream), `answers` (read the final answer and
the number or letter in it) and `Chat` (a model's replies, batched or streamed)."""

from gptoss_jax.chat.harmony import ChatMessage
from gptoss_jax.chat.session import Chat, ChatDelta, ChatReply, chat

__all__ = ["Chat", "ChatDelta", "ChatMessage", "ChatReply", "chat"]
