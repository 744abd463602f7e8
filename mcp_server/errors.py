"""What can go wrong between the bridge and LM Studio, in words a person can act on.

Every failure of the LM Studio client is one of these; the tool layer turns them into
`is_error` results whose text is the exception's message.
"""


class LMStudioError(Exception):
    """Base of the family: `str(exc)` is the message shown to the caller."""

    partial: str = ""
    """Text generated before a failure mid-answer, so the caller loses nothing."""


class Unreachable(LMStudioError):
    """Nothing answers at the configured URL (server stopped, wrong port, wrong host)."""


class UpstreamTimeout(LMStudioError):
    """LM Studio took longer than the configured timeout."""


class AuthRequired(LMStudioError):
    """LM Studio wants an API token, or rejected the one we sent."""


class ModelNotFound(LMStudioError):
    """The model is unknown to LM Studio, or nothing is loaded and JIT loading failed."""


class BadUpstreamResponse(LMStudioError):
    """LM Studio answered with something we cannot read, or dropped the connection mid-answer."""


class UpstreamError(LMStudioError):
    """LM Studio answered with an error that fits none of the cases above."""
