"""Stores damaged by a kill at the worst moment or a full disk, on the real stores in a
temporary folder: what can be repaired is, with a line that says so; the rest is one error line
naming the file, never a traceback and never a write that makes it worse."""
from __future__ import annotations

import optuna

from carrot.cli import main
from carrot.study import open_storage

ARGS = ["--variant", "baseline", "--epochs", "1", "--image-size", "16", "--no-progress",
        "--set", "eval.probe=final", "--set", "data.batch_size=32"]
NAME = "digits-test_resnet-baseline"


def _journal_with_a_study(store):
    assert main(["study", *ARGS, "--trials", "1"]) == 0
    path = store / "studies" / "optuna.journal"
    assert path.read_bytes().endswith(b"\n")
    return path


def test_a_journal_whose_last_record_was_cut_short_is_repaired_and_goes_on(store, capsys):
    path = _journal_with_a_study(store)
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])  # the last append was interrupted 40 bytes before its end
    capsys.readouterr()
    assert main(["study", *ARGS, "--trials", "1"]) == 0
    err = capsys.readouterr().err
    assert "carrot: studies/optuna.journal: its last record was cut short" in err and "Traceback" not in err
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.startswith(whole[: whole.rfind(b"\n", 0, len(whole) - 40) + 1])
    # the journal reads back whole, with the trials of both commands
    study = optuna.load_study(study_name=NAME, storage=open_storage(str(path)))
    assert len(study.trials) >= 2
    assert main(["study", *ARGS, "--trials", "1"]) == 0  # and it goes on being readable


def test_a_journal_damaged_in_the_middle_is_one_error_line_and_is_left_as_it_is(store, capsys):
    path = _journal_with_a_study(store)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:10] + b"\x00garbage" + lines[3][10:]
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    capsys.readouterr()
    for argv in (["study", *ARGS, "--trials", "1"], ["worker", "--study-name", NAME, "--trials", "1"],
                 ["final", "--seeds", "1", "--epochs", "1"], ["train", *ARGS]):  # train: not "no baseline yet"
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("carrot: error: the Optuna journal studies/optuna.journal is damaged: line 4 is not a "
                              "JSON record"), err
        assert path.read_bytes() == before  # nothing appended onto the damage


def test_tables_note_a_damaged_journal_and_write_the_other_tables(store, tmp_path, capsys):
    path = _journal_with_a_study(store)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"{not json\n"
    path.write_bytes(b"".join(lines))
    out = tmp_path / "tables"
    assert main(["tables", "--out", str(out)]) == 0
    note = (out / "importance.md").read_text()
    assert "cannot read Optuna storage studies/optuna.journal: JSONDecodeError" in note, note


def test_a_damaged_mlflow_database_is_one_error_line_for_every_command(store, capsys, monkeypatch):
    from carrot import tracking

    _journal_with_a_study(store)
    db = store / "mlruns" / "mlflow.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    before = db.read_bytes()
    monkeypatch.setattr(tracking, "_READY", set())  # as in a new process: the store is opened afresh
    capsys.readouterr()
    for argv in (["study", *ARGS, "--trials", "1"], ["train", *ARGS], ["tables", "--out", str(store / "t")],
                 ["plots", "--out", str(store / "p")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "the MLflow store" in err and "mlflow.db cannot be read: (sqlite3.DatabaseError) database disk image " \
            "is malformed; expected the SQLite database of an MLflow store" in err, err
        assert db.read_bytes() == before
    assert not (store / "t").exists() and not (store / "p").exists()


def test_an_intact_journal_is_opened_without_taking_optunas_lock(store, capsys):
    """Only a cut-short tail needs the lock: with an intact journal, a lock file that another
    process holds (or left behind) neither delays the command nor is touched."""
    path = _journal_with_a_study(store)
    lock = store / "studies" / "optuna.journal.lock"
    lock.symlink_to(path)  # what Optuna's JournalFileSymlinkLock holds while it appends
    capsys.readouterr()
    storage = open_storage(str(path))
    assert optuna.load_study(study_name=NAME, storage=storage).trials
    assert "lock" not in capsys.readouterr().err
    assert lock.is_symlink()  # still there: nobody waited for it or freed it


def test_the_journal_lock_points_at_the_journal_and_a_stale_one_pointing_nowhere_is_freed(store, capsys):
    """Optuna's lock is a link to the journal, named as it was given: with the default relative
    path it pointed nowhere, so Optuna could never free one that a killed process left, and every
    later command waited for ever (spinning on a CPU)."""
    import os
    import time

    from optuna.storages.journal import JournalFileSymlinkLock

    (store / "studies").mkdir()
    journal = store / "studies" / "optuna.journal"
    storage = open_storage(None)  # studies/optuna.journal, relative
    optuna.create_study(study_name="a", storage=storage)
    lock = store / "studies" / "optuna.journal.lock"
    taken = JournalFileSymlinkLock(storage._backend._file_path)  # the lock Optuna's appends take
    taken.acquire()
    try:
        assert lock.is_symlink() and lock.resolve() == journal.resolve()  # Optuna can free it after a kill
    finally:
        taken.release()

    lock.symlink_to("studies/optuna.journal")  # as a killed process left it, pointing nowhere
    old = time.time() - 60
    os.utime(lock, (old, old), follow_symlinks=False)
    capsys.readouterr()
    optuna.create_study(study_name="b", storage=open_storage(None))  # an append: waited for ever
    assert not os.path.lexists(lock)
    assert "removed a stale lock of the file (optuna.journal.lock" in capsys.readouterr().err
    lock.symlink_to("studies/optuna.journal")  # a fresh one may be held: left alone
    open_storage(None)
    assert os.path.lexists(lock)
