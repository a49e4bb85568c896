"""The one family of errors moelocal raises for things a user can get wrong.

Every error carries a one-line message and, where there is one, the next step to take.
The CLI turns them into ``Error: ...`` on stderr and an exit code; nothing else formats them.
"""

from __future__ import annotations


class MoelocalError(Exception):
    """Base of every error a user can cause; ``hint`` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelFileError(MoelocalError):
    """A model path that does not exist, is not a file, or is not a readable GGUF model."""

    exit_code = 2


class GGUFFormatError(ModelFileError):
    """The bytes are not a well-formed GGUF header."""


class NeedMoreBytes(GGUFFormatError):
    """The header continues past the bytes given; ``needed`` is a lower bound on the total."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"GGUF header needs at least {needed} bytes")
        self.needed = needed


class HardwareSpecError(MoelocalError):
    """A hardware override that cannot be parsed (``--vram 24XB``)."""

    exit_code = 2


class UsageError(MoelocalError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class DoesNotFitError(MoelocalError):
    """No placement fits the memory of this machine (or of the one described)."""

    exit_code = 3


class HubError(MoelocalError):
    """The Hugging Face Hub could not give what was asked (repo, file, quantization, network)."""

    exit_code = 4


class DownloadError(HubError):
    """A download failed or did not verify; nothing that looks complete was left behind."""


class EngineError(MoelocalError):
    """llama.cpp could not load or run the model."""

    exit_code = 5
