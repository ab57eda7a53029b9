"""The one exception hierarchy of closeloop.

Every error says what is wrong and what to do about it. Errors about *input*
(a record that cannot be processed) are not raised across stage boundaries:
stages turn them into dead-letter records (see :class:`InputError`).
"""

from __future__ import annotations


class CloseloopError(Exception):
    """Base class of every closeloop error."""


class ConfigError(CloseloopError):
    """A setting is missing or invalid; the message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        msg = f"config key {key!r}: {problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class InputError(CloseloopError):
    """A record could not be processed; it goes to the dead-letter topic with this reason."""

    def __init__(self, reason: str, *, stage: str = "", detail: str = "") -> None:
        self.reason = reason
        self.stage = stage
        self.detail = detail
        super().__init__(
            f"{stage + ': ' if stage else ''}{reason}{' (' + detail + ')' if detail else ''}"
        )


class PayloadTooLarge(InputError):
    """An input exceeds a configured size limit."""


class BrokerError(CloseloopError):
    """The Kafka broker cannot be started, reached or written to."""


class StoreError(CloseloopError):
    """ClickHouse (server or chDB) cannot be opened, reached or written to."""


class LLMError(CloseloopError):
    """The LLM endpoint failed or answered with something unusable."""


class ActError(CloseloopError):
    """A proposed change was refused (outside the allowlist, does not apply, too large...)."""


class AlreadyApplied(ActError):
    """The base already holds the change a diagnosis calls for (an earlier merge made it)."""


class ReviewError(CloseloopError):
    """A review action is not allowed (unknown proposal, already decided, bad signature...)."""
