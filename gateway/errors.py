"""The gateway's error hierarchy: one base class, a few meaningful kinds.

Every message says what happened and what the operator can do about it.
"""


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; `problems` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class OutboxFull(GatewayError):
    """The outbox reached its size bound, or the disk is full: stop acknowledging."""


class OutboxCorrupt(GatewayError):
    """The outbox file failed its integrity check."""


class TemporaryFailure(GatewayError):
    """A delivery failed in a way that may succeed later (network, 4xx)."""


class PermanentFailure(GatewayError):
    """A delivery failed for good (5xx): the message is dead-lettered."""


class StoreUnavailable(GatewayError):
    """The outbox cannot be written now (locked, I/O error): nothing was stored, retry."""


class Unstorable(GatewayError):
    """This alert can never be stored (its data, not the disk, is at fault): reject it."""


class ThreadDied(GatewayError):
    """A thread that intake or storage depends on has ended: the daemon must restart."""


class LocalRoomFull(OutboxFull):
    """Local mail holds its whole share of the outbox (all users', or this user's):
    alerts keep the rest. `reason` is the status counter it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
