"""Inside the container: a sensor on a pty, for the system tests.

Runs with the package's interpreter (/opt/mailgw/bin/python3, which has
firmware_bridge). Makes a pty whose slave looks like a USB-serial adapter (root:dialout
0660), links it at the path the gateway's config names, then obeys stdin:
`alert N` sends N framed alerts and prints `acked K` once K of them are acknowledged.
"""

import os
import sys
import tty
from pathlib import Path

from firmware_bridge.device import Device

LINK = Path(sys.argv[1])
master, slave = os.openpty()
tty.setraw(slave)
name = os.ttyname(slave)
os.chown(name, 0, 20)  # dialout
os.chmod(name, 0o660)
LINK.parent.mkdir(parents=True, exist_ok=True)
LINK.unlink(missing_ok=True)
LINK.symlink_to(name)
dev = Device(master, device_id="systest-sim", retry_min=0.2, retry_max=1.0).start()
print(f"ready {name}", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.partition(" ")
    if cmd == "alert":
        seqs = {dev.alert("door", "critical", f"door open {i}") for i in range(int(arg))}
        dev.wait_acked(seqs, timeout=60)
        print(f"acked {len(seqs & dev.acked)}", flush=True)
dev.stop()
