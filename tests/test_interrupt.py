"""One stop request that arrives as several signals stops once; a later signal exits at once."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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


def test_the_coordinator_passes_a_stop_on_within_a_tenth_of_a_second(monkeypatch):
    """Between two looks at the study the `--jobs n` coordinator waits POLL_S; a stop arriving then
    must reach the workers well inside interrupt.REPEAT_S, or the workers, which got the group's
    signal too, take the coordinator's copy for a second request and exit at once. On a clock of
    its own: the stop comes 0.35 s into the wait."""
    from types import SimpleNamespace

    from carrot import interrupt, workers

    clock = [0.0]

    def sleep(seconds):
        assert seconds >= 0
        clock[0] += seconds
        if clock[0] >= 0.35 and not interrupt._received:
            interrupt._received.append(15)

    monkeypatch.setattr(interrupt, "_received", [])
    monkeypatch.setattr(workers, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    workers._pause(workers.POLL_S, stopping=False)
    assert 0.35 <= clock[0] <= 0.35 + 0.1 + 1e-9, clock[0]

    clock[0] = 0.0  # once stopping, the coordinator waits its whole pause again (and no longer)
    workers._pause(workers.POLL_S, stopping=True)
    assert abs(clock[0] - workers.POLL_S) < 1e-9


def test_a_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    """Before the command's handlers are in place (parsing its arguments), Python's own
    KeyboardInterrupt gave a traceback."""
    from carrot import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["variants"]) == 130
    assert capsys.readouterr().err == "carrot: interrupted\n"


@pytest.mark.parametrize("command", [["study", "--trials", "1"], ["train"]])
def test_a_stop_before_the_first_store_makes_nothing(tmp_path, monkeypatch, capsys, command):
    """A Ctrl-C in a command's first seconds (loading torch, checking the data) was noted, and the
    command went on to create the MLflow database, the study journal and the study's parent run
    before it stopped. The signal is sent for real, right after the data check."""
    import os
    import signal

    from carrot import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    checked = cli._preflight_data

    def check_then_ctrl_c(*args, **kwargs):
        checked(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli, "_preflight_data", check_then_ctrl_c)
    assert cli.main(command + ["--epochs", "1", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "carrot: interrupted by SIGINT before any store or run was made"
    assert list(tmp_path.iterdir()) == []
