"""MQTT deliveries committed whose PUBACK the broker is not known to have had.

Kept so that the broker's redelivery of a committed message is recognised and acked
without being stored again (gateway/sources/mqtt.py has the confirmation round trip).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.outbox.model import MqttKey


def redelivered(c: sqlite3.Connection, mk: MqttKey, pending: dict[int, tuple[Any, ...]]) -> bool:
    """Is this DUP delivery the broker's redelivery of a message committed already?

    Yes if its packet id has a row with the same digest: the broker cannot hold two
    messages under one packet id, and reuses an id only once it has our PUBACK, after
    which the MQTT source deletes the row as soon as it learns so (a confirmation
    round trip, mqtt.py). The row now belongs to this connection: it is acknowledged
    again here, and only this connection's confirmation may retire it.
    """
    if mk.mid in pending:  # the original is in this very transaction
        if pending[mk.mid][1] != mk.digest:
            return False
        pending[mk.mid] = (*pending[mk.mid][:3], mk.conn)
        return True
    row = c.execute("SELECT digest FROM mqtt_pending WHERE mid = ?", (mk.mid,)).fetchone()
    if row is None or bytes(row[0]) != mk.digest:
        return False
    c.execute("UPDATE mqtt_pending SET conn = ? WHERE mid = ?", (mk.conn, mk.mid))
    return True
