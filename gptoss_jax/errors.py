"""The project's exception types: every user-facing failure is one of these, with a one-line message."""


class GptOssError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(GptOssError):
    """A config file or preset that does not describe a gpt-oss model."""


class CheckpointError(GptOssError):
    """A checkpoint path, file, index or tensor that cannot be loaded as gpt-oss."""


class DataError(GptOssError):
    """A data file (eval examples, training conversations, RL prompts) that cannot be read; the message
    names the file and line."""
