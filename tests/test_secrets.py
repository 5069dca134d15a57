"""No password from a storage URL or tracking URI reaches output, errors or tags."""
from __future__ import annotations

import pytest

from carrot.cli import main
from carrot.contract import redact


def test_redact_masks_passwords_and_tokens():
    assert redact("postgresql://alice:s3cret@host:5432/db") == "postgresql://alice:***@host:5432/db"
    assert redact("failed for s3cret!", "postgresql://alice:s3cret@host/db") == "failed for ***!"
    assert redact("http://tracking:5000/?token=abc&x=1") == "http://tracking:5000/?token=***&x=1"
    assert redact("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"


def test_a_password_with_a_raw_at_sign_is_masked_whole():
    """The user information of a URL runs to the authority's last "@": a password such as
    ``p@ss`` is masked whole, not cut at its own "@" (which left "ss" readable and masked every
    "p" of the text)."""
    from carrot.tracking import ui_base

    url = "http://alice:p@ss@tracking.example:5000"
    assert redact(url) == "http://alice:***@tracking.example:5000"
    assert redact(f"cannot reach {url} (ConnectionError)", url) == \
        "cannot reach http://alice:***@tracking.example:5000 (ConnectionError)"
    assert ui_base(url) == "http://tracking.example:5000"
    assert ui_base("http://tracking.example:5000/mlflow@v2") == "http://tracking.example:5000/mlflow@v2"
    assert redact("postgresql://bob:a@b:c@db/x") == "postgresql://bob:***@db/x"


def test_a_storage_password_never_reaches_the_output(store, capsys):
    url = "postgresql://alice:s3cret@127.0.0.1:9/db"
    code = main(["study", "--variant", "baseline", "--epochs", "1", "--trials", "1", "--no-progress",
                 "--storage", url])
    out, err = capsys.readouterr()
    assert code == 2
    assert "s3cret" not in out + err
    assert "alice:***@127.0.0.1" in err and len(err.strip().splitlines()) == 1


def test_a_known_urls_password_is_masked_whatever_it_holds(monkeypatch):
    """The password of a URL handed to redact, of the command's storage (remember_url) and of
    MLFLOW_TRACKING_URI is known whole: a "/" or a space in it, or a driver that split the URL
    at its first "@" and named the rest as the host, leaves nothing of it readable."""
    from carrot import contract

    monkeypatch.setattr(contract, "_SECRET_URLS", set())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = "postgresql://u:se/cr et9@127.0.0.1:1/db"
    assert redact(f"cannot open Optuna storage {url}: refused", url) == \
        "cannot open Optuna storage postgresql://u:***@127.0.0.1:1/db: refused"
    url = "postgresql://u:p@ss@word9@127.0.0.1:1/db"
    message = f"cannot open {url}: failed to resolve host 'ss@word9@127.0.0.1'"
    assert redact(message, url) == \
        "cannot open postgresql://u:***@127.0.0.1:1/db: failed to resolve host '***@127.0.0.1'"
    url = "postgresql://u:p%40ss%2Fword@h/db"  # percent-encoded: a driver may print it decoded
    assert redact("password p@ss/word rejected", url) == "password *** rejected"
    assert redact("the class of a pass", "postgresql://u:ab@ss@h/db") == "the class of a pass"  # "ss": too short

    text = "error: could not connect with s3cr/et"
    assert redact(text) == text  # not known: nothing to mask
    contract.remember_url("postgresql://bob:s3cr/et@h/db")
    assert redact(text) == "error: could not connect with ***"
    monkeypatch.setattr(contract, "_SECRET_URLS", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg://bob:s3cr/et@h/db")
    assert redact(text) == "error: could not connect with ***"


def test_a_worker_never_shows_any_part_of_a_password_with_at_signs(store, capsys):
    url = "postgresql://u:p@ss@word9@127.0.0.1:1/db"
    assert main(["worker", "--study-name", "x", "--trials", "1", "--no-progress", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "postgresql://u:***@127.0.0.1:1/db" in err, err
    assert "word9" not in err and "p@ss" not in err


def test_the_tables_never_write_the_storage_password(store, tmp_path, capsys):
    """The importance table names the Optuna storage it read (or could not read): with its
    password masked in the .md, .tex and .csv files and on the screen."""
    from analysis.tables import main as tables_main
    from carrot.tracking import client, experiment_id

    mlf = client()
    for role in ("trial", "final"):  # runs of a variant, whose importance row notes why there is none
        mlf.create_run(experiment_id(mlf, "carrot"), tags={
            "carrot.dataset": "digits", "carrot.backbone": "test_resnet", "carrot.role": role,
            "carrot.variant": "barrier", "carrot.study": "digits-test_resnet-barrier"})
    out = tmp_path / "out"
    url = "postgresql://u:secretpw9@127.0.0.1:1/db"
    assert tables_main(["--storage", url, "--out", str(out)]) == 0
    printed = "".join(capsys.readouterr())
    written = {p.name: p.read_text() for p in out.iterdir()}
    assert "importance.md" in written and "importance.csv" in written
    assert "postgresql://u:***@127.0.0.1:1/db" in written["importance.md"]
    assert not [name for name, text in written.items() if "secretpw9" in text]
    # the driver's message is cut to its first line (its tab-indented detail and link went into the note)
    assert not [name for name, text in written.items() if "sqlalche.me" in text or "\t" in text]
    assert "secretpw9" not in printed


def test_the_tables_never_create_an_optuna_storage(store, tmp_path):
    from analysis.tables import main as tables_main
    from carrot.tracking import client

    client()  # an empty MLflow store
    db = tmp_path / "none.db"
    assert tables_main(["--storage", f"sqlite:///{db}", "--out", str(tmp_path / "out")]) == 0
    assert not db.exists()


@pytest.mark.parametrize("password, driver_says", [("hunter2@prod-db/x", "prod-db"), ("p@ss w/rd", "ss w")])
def test_what_a_driver_takes_for_the_host_in_a_password_is_masked(password, driver_says):
    """libpq splits `user:hunter2@prod-db/x@host` at the first "@" and names `prod-db` as the host
    it could not resolve; that part of the password reached the output and the tables' notes."""
    url = f"postgresql://alice:{password}@127.0.0.1:1/studies"
    text = f"cannot open {url}: failed to resolve host '{driver_says}'"
    assert redact(text, url) == "cannot open postgresql://alice:***@127.0.0.1:1/studies: failed to resolve host '***'"


def test_an_unknown_tracking_scheme_is_one_line_without_its_password(store, capsys, monkeypatch):
    """MLflow answered `foo://bob:tr4ckPW@x` with a 50-line traceback that printed the password."""
    from analysis.tables import main as tables_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bob:tr4ckPW@x")
    assert main(["train", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("carrot: error: MLflow tracking URI foo://bob:***@x: unknown scheme 'foo'; expected "
                   "sqlite:///path/to/mlflow.db, an http(s):// tracking server or a database URL (postgresql://)")
    assert tables_main(["--out", str(store / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "foo://bob:***@x: unknown scheme" in err and "tr4ckPW" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "relative/mlruns")  # a folder store: MLflow 3 refuses it
    assert main(["train", "--epochs", "1", "--no-progress"]) == 2
    assert "a folder store is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == ["mlruns"]  # the fixture's, still empty
    assert list((store / "mlruns").iterdir()) == []


def test_make_does_not_echo_a_storage_password(tmp_path):
    """make printed each recipe, `carrot study --storage postgresql://u:pa55w0rd@...`, before
    carrot's own (masked) error."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    venv = Path(sys.executable).parent.parent
    url = "postgresql://u:pa55w0rd@127.0.0.1:1/db"
    for target in (["study", "TRIALS=1", "EPOCHS=1"], ["worker", "STUDY=s"], ["tables"]):
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
        done = subprocess.run(["make", "--no-print-directory", "-C", str(repo), "-o", str(venv / ".installed"),
                               f"VENV={venv}", f"STORAGE={url}", *target], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert "pa55w0rd" not in done.stdout + done.stderr, (target, done.stdout, done.stderr)
