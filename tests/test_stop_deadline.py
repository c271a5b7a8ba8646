"""After its orderly shutdown the daemon's process ends by the stop deadline, whatever
its threads are doing (gateway/service.py `_leave`): a call blocked in the loop's thread
pool is abandoned with a log line naming the thread; a writer still committing is waited
for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import logging, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace
    from gateway import service

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    executor = ThreadPoolExecutor(thread_name_prefix="mailgw-io")
    executor.submit(threading.Event().wait)  # a call that never returns
    committed = []

    def commit():
        time.sleep(1.0)
        committed.append(1)
        print("commit done", flush=True)

    writer_thread = threading.Thread(target=commit, daemon=True)
    writer_thread.start()
    writer = SimpleNamespace(alive=True, thread=writer_thread)
    # SIGTERM came {ago} s ago: the deadline is {left} s away.
    daemon = SimpleNamespace(
        writer=writer, outbox=object(), stop_asked=time.monotonic() - {ago}
    )
    service._leave(daemon, executor, 0)
    print("not abandoned", flush=True)
    """
)


def _run(ago: float) -> tuple[subprocess.CompletedProcess[str], float]:
    left = service_exit_within() - ago
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(ago=ago, left=left)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r, time.monotonic() - t0


def service_exit_within() -> float:
    from gateway import service

    return service.EXIT_WITHIN


def test_a_thread_blocked_past_the_deadline_is_abandoned_the_writer_is_not() -> None:
    r, took = _run(ago=service_exit_within() - 1.0)  # one second left
    assert r.returncode == 0, r.stderr
    assert "commit done" in r.stdout  # waited for, though the deadline is shorter
    assert "not abandoned" not in r.stdout  # os._exit: nothing after _leave runs
    assert "exiting with 1 thread(s) still blocked in a call (mailgw-io_0)" in r.stderr
    assert took < 10, took
