"""The error taxonomy shared by every part of chatpipe.

`InvalidEvent` is poison input: it goes to a dead-letter topic with its reason and is never retried.
Everything else that can be retried carries `retriable = True` and propagates.
"""

from __future__ import annotations


class ChatpipeError(Exception):
    """Base of every error chatpipe raises on purpose."""

    retriable: bool = False


class InvalidEvent(ChatpipeError):
    """Input that can never be processed as it is.

    `code` is the 8x8-style error code answered to the caller, `http_status` the HTTP status, `field` the
    JSON path of the offending field when there is one, `raw` the input, kept whole for the DLQ.
    """

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        code: int = 1000,
        http_status: int = 400,
        raw: bytes = b"",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.code = code
        self.http_status = http_status
        self.raw = raw


class SchemaError(ChatpipeError):
    """A schema could not be registered, fetched, or is incompatible."""


class TransientError(ChatpipeError):
    """A dependency (broker, registry, database) is unavailable for now; retry later."""

    retriable = True
