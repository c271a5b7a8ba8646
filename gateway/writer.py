"""Moved to gateway/outbox/writer.py; this name stays while other branches import it."""

from gateway.outbox.writer import Done, Stored, Writer

__all__ = ["Done", "Stored", "Writer"]
