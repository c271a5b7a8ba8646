"""Inside the container: try what the sandbox must forbid, print one errno per line.

Run once as the mailgw user in the open (the control) and once inside the service's
sandbox (its mount namespace and cgroup), so a denial is the unit's doing and not
just file permissions.
"""

import errno
import os
import sys


def attempt(label, fn):
    try:
        fn()
        print(label, "ok")
    except OSError as exc:
        print(label, errno.errorcode.get(exc.errno, str(exc.errno)))


def write(path):
    with open(path, "w") as f:
        f.write("probe\n")
    os.unlink(path)


def read(path):
    with open(path) as f:
        f.read()


def open_tty(path):
    os.close(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))


attempt("write-state", lambda: write("/var/lib/mailgw/probe"))
attempt("write-elsewhere", lambda: write("/srv/mailgw-owned/probe"))
attempt("read-home", lambda: read("/home/operator/notes"))
attempt("open-allowed-tty", lambda: open_tty(sys.argv[1]))
attempt("open-other-tty", lambda: open_tty(sys.argv[2]))
