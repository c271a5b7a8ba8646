"""Moved to gateway/outbox/seen.py; this name stays while other branches import it."""

from gateway.outbox.seen import Run, merge, split_key

__all__ = ["Run", "merge", "split_key"]
