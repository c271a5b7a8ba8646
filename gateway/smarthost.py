"""One smarthost of the failover list ([smtp], then each [[smtp.fallback]]): its own
schedule of tries, waits, token source, send rate, and the sessions it allows.

The relay sends through the first smarthost, in the configured order, that may be
tried now (`Host.usable`): a failure to reach or use the one in use (UplinkDown, a
refused login, an account pause) holds it on its own backoff, and the next one takes
over at once, without charging a message. When the primary's backoff ends the relay
tries it again (a session opened is the probe: connect, EHLO, TLS, AUTH) and returns to
it as soon as it answers. Only when every smarthost is held does the relay wait as a
whole (invariant 4).

A server that refuses one session more than it allows (a 421 "too many connections" at
the greeting, a refused connect while our other sessions to it work) is not down: the
host's concurrency shrinks to the sessions that work, for CROWDED_FOR seconds.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from gateway.config import SmtpSection
from gateway.oauth import TokenSource
from gateway.pace import Bucket, describe
from gateway.runtime import Runtime
from gateway.uplink import Uplink
from gateway.waits import Waits

log = logging.getLogger(__name__)

# How long a smarthost that refused one session too many is given fewer sessions: long
# enough not to knock at every batch, short enough to use a limit raised meanwhile.
CROWDED_FOR = 60.0


def account(cfg: SmtpSection) -> tuple[str, str] | None:
    """(username, where its secret comes from): smarthosts with the same one log in as
    the same account, so a login refused by one would be refused by the others, and
    each refusal counts towards the account's lockout. None without AUTH."""
    if not cfg.username:
        return None
    if cfg.oauth is not None:
        o = cfg.oauth
        source = f"oauth {o.token_url} {o.client_id} {o.client_secret_file} {o.refresh_token_file}"
    else:
        source = str(cfg.oauth_token_file or cfg.password_file or "credential smtp-password")
    return cfg.username, source


class Host:
    def __init__(
        self, index: int, cfg: SmtpSection, runtime: Runtime, rng: random.Random, state_dir: Path
    ) -> None:
        self.index = index
        self.cfg = cfg
        self.name = cfg.where
        self.role = "primary" if index == 0 else f"fallback {index}"
        self.uplink = Uplink(cfg.probe_max, rng, cfg.return_jitter)
        self.status: dict[str, Any] = {
            "host": self.name,
            "role": self.role,
            "active": False,
            "state": "unknown",
            "sessions": 0,
            "limit": cfg.sessions,
            "last_error": None,
            "next_probe_at": None,
            "hold": None,
            "sent": 0,
        }
        many = len(cfg.hosts) > 1 or index > 0
        self.waits = Waits(
            self.uplink, runtime, cfg, self.status, runtime.sum_hosts if many else None
        )
        # One token source per smarthost, for all its sessions: a token outlives the
        # session it came for. Each fallback caches its own.
        cache = "oauth-token.json" if index == 0 else f"oauth-token-fallback{index}.json"
        self.tokens = (
            TokenSource(cfg.oauth, cfg.timeout, cache=state_dir / cache) if cfg.oauth else None
        )
        rate = cfg.rate_limit
        self.pace: Bucket | None = None
        self.pace_info: dict[str, Any] = {}
        if rate:
            self.pace = Bucket(*rate, time.monotonic())
            self.pace_info.update(rate_limit=describe(*rate), waits=0, next_send_at=None)
            self.status["rate_limit"] = self.pace_info["rate_limit"]
        self.open = 0  # sessions of ours open to it now
        self.account = account(cfg)
        self._crowded_until = 0.0
        self._crowd_limit = cfg.sessions

    def usable(self, now: float) -> bool:
        """A session may be tried now (it is not held on a backoff or pause)."""
        return not self.uplink.holding(now)

    def allowed(self, now: float) -> int:
        """How many sessions to it may be open now."""
        limit = self._crowd_limit if now < self._crowded_until else self.cfg.sessions
        self.status["limit"] = limit
        return limit

    def crowded(self, now: float, why: str) -> None:
        """It refused one session more than it allows, while `self.open` of ours work."""
        # One fewer each time, never fewer than work now: a count of ours taken while
        # another session was closing or logging in may be one off, and the limit
        # settles where the server stops refusing.
        limit = max(1, self.open, self.allowed(now) - 1)
        if limit < self.allowed(now) or now >= self._crowded_until:
            log.info(
                "%s refused another session while %d of ours are open (%s); using %d "
                "session(s) for %.0f s (smtp.sessions is %d)",
                self.name,
                self.open,
                why,
                limit,
                CROWDED_FOR,
                self.cfg.sessions,
            )
        self._crowd_limit = limit
        self._crowded_until = now + CROWDED_FOR
        self.status["limit"] = limit

    def opened(self) -> None:
        self.open += 1
        self.status["sessions"] = self.open
        # A session refused while another was still logging in counted one too few:
        # what works at once is what the server allows.
        self._crowd_limit = max(self._crowd_limit, self.open)

    def closed(self) -> None:
        self.open = max(0, self.open - 1)
        self.status["sessions"] = self.open
