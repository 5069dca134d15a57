"""One stop request that arrives as several signals stops once; a later signal exits at once."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from carrot import interrupt
    interrupt.REPEAT_S = 0.5
    with interrupt.graceful():
        # a group's signal and a parent's forward of it: both within microseconds
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        print("still here", interrupt.requested(), flush=True)
        time.sleep(0.6)
        os.kill(os.getpid(), signal.SIGINT)  # the person asks again, later: exit now
        time.sleep(5)
        print("not reached", flush=True)
""")


def test_copies_of_one_signal_are_one_request_and_a_later_one_exits_at_once():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == [f"still here {int(__import__('signal').SIGTERM)}"], proc
    assert proc.returncode == 130, proc
    assert proc.stderr.splitlines() == [
        "carrot: SIGTERM received: stopping at the next step (send it again, 0.5 s or more later, to exit at "
        "once)",
        "carrot: SIGINT again: exiting now"], proc.stderr
