"""No password from a storage URL or tracking URI reaches output, errors or tags."""
from __future__ import annotations

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
