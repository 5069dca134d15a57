"""Bad input: one clear line naming what is wrong and what is valid, exit 2, no run created."""
from __future__ import annotations

import pytest

from carrot.cli import main


def _runs(store):
    from mlflow.tracking import MlflowClient

    import os

    c = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("carrot")
    return [] if exp is None else c.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["study", "--variant", "nope"], ["unknown", "nope", "baseline", "expansion"]),
        (["study", "--variant", "expanson"], ["did you mean 'expansion'?"]),
        (["train", "--dataset", "digit"], ["did you mean 'digits'?"]),
        (["train", "--dataset", "imagenet42"], ["dataset", "imagenet42", "digits", "synthetic"]),
        (["study", "--backbone", "resnet_does_not_exist"], ["backbone", "resnet_does_not_exist", "timm"]),
        (["study", "--epochs", "-1"], ["epochs=-1", "positive integer"]),
        (["study", "--trials", "0"], ["trials=0", "positive integer"]),
        (["train", "--set", "optim.nonsense=3"], ["unknown config key", "optim.nonsense"]),
        (["train", "--set", "variant.hparams.zzz=1"], ["variant 'baseline' has no hyperparameters", "zzz"]),
        (["train", "--variant", "barrier", "--set", "variant.hparams.zzz=1"], ["zzz", "for variant 'barrier'; valid"]),
        (["train", "--dataset", "cub"], ["cub", "root"]),
        (["train", "--device", "tpu"], ["device", "tpu", "cpu"]),
        (["train", "--variant", "expansion", "--set", "variant.hparams.detach_stats=maybe"],
         ["detach_stats", "maybe", "true or false"]),
        (["study", "--set", "data.batch_size=5000"], ["batch_size=5000", "training split"]),
    ],
)
def test_bad_input_is_one_clear_line(store, capsys, argv, expected):
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("carrot: error:")
    for word in expected:
        assert word in err, (word, err)
    assert _runs(store) == []
    assert not (store / "studies" / "optuna.journal").exists() or argv[0] != "study" or "--trials" in argv


def test_unwritable_store_fails_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    code = main(["study", "--trials", "1", "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "MLflow store is not writable" in err and str(blocker) in err
    assert not (tmp_path / "studies").exists()


def test_unwritable_study_storage(store, capsys):
    blocker = store / "blocker"
    blocker.write_text("x")
    code = main(["study", "--trials", "1", "--epochs", "1", "--storage", str(blocker / "s.journal"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Optuna study storage is not writable" in err
    assert _runs(store) == []


def test_yaml_syntax_error_names_file_line_and_column(store, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  epochs: [1, 2\n")
    assert main(["train", "--config", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:" in err and "not valid YAML" in err, err
    line, column = err.split(f"{bad}:")[1].split(":")[:2]
    assert int(line) >= 3 and int(column) >= 1
    assert _runs(store) == []


@pytest.mark.parametrize("text, where, key, first", [
    ("optim:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "4:3", "lr", 2),
    ("optim:\n  lr: 0.1\nseed: 1\noptim:\n  epochs: 2\n", "4:1", "optim", 1),
])
def test_a_key_given_twice_in_a_config_file_is_one_line(store, capsys, tmp_path, text, where, key, first):
    """YAML kept the last of two equal keys without a word: `lr: 0.1` then `lr: 0.2` trained at 0.2,
    and a second `optim:` section dropped the first."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"carrot: error: config file {path}:{where}: the key {key!r} is given twice in one section (first on line "
        f"{first}); expected each key once")
    assert _runs(store) == []


def test_set_values_are_yaml_1_2_numbers():
    from carrot.config import parse_value as _parse_value

    assert _parse_value("1e-3") == 1e-3 and isinstance(_parse_value("1e-3"), float)
    assert _parse_value("3") == 3 and _parse_value("true") is True and _parse_value("kl") == "kl"
    # a quoted value is a string, whatever it looks like: the only way to give a numeric-looking one
    assert _parse_value('"2024"') == "2024" and _parse_value("'1e-3'") == "1e-3"


def test_a_numeric_looking_string_can_be_set_quoted_and_the_error_says_how(capsys):
    from carrot.cli import build_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["config", "--set", 'experiment="2024"'])
    assert build_config(args).experiment == "2024"
    assert main(["config", "--show", "--set", "experiment=2024"]) == 2
    assert capsys.readouterr().err.strip() == (
        "carrot: error: invalid experiment=2024: expected a string (a number or true/false reads as one: quote it, "
        "--set experiment='\"2024\"')")


def test_one_class_dataset_is_refused_before_any_run(store, capsys, tmp_path):
    import fixtures_fgvc as fx

    root = fx.make_imagefolder(tmp_path / "one", with_val=False, classes=fx.IMAGEFOLDER_CLASSES[:1]).root
    assert main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class" in err, err
    assert _runs(store) == []


def test_unreachable_tracking_server_fails_fast_without_its_password(store, capsys, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw123@127.0.0.1:9")
    start = time.time()
    assert main(["train", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - start < 15
    assert len(err.splitlines()) == 1 and "unreachable" in err and "pw123" not in err, err



@pytest.mark.parametrize("argv, words", [
    (["study", "--epochs", "abc"], "carrot study: error: argument --epochs: expected an integer, got 'abc'"),
    (["worker"], "carrot worker: error: the following arguments are required: --study-name"),
    (["study", "--bogus"], "carrot study: error: unrecognized arguments: --bogus"),
    (["tables", "--bogus"], "carrot tables: error: unrecognized arguments: --bogus"),
    (["plots", "--bogus"], "carrot plots: error: unrecognized arguments: --bogus"),
])
def test_a_bad_argument_is_one_line_not_the_usage_block(argv, words, capsys):
    from carrot.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{words} (see `{words.split(': error')[0]} --help`)"], err


@pytest.mark.parametrize("command", ["study", "worker", "train", "final", "evaluate", "config", "bench", "tables",
                                     "plots"])
def test_every_flag_says_its_default(command, capsys):
    import re

    from carrot.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", options)  # one block per flag: its line and its help's lines
    missing = [b.split()[0] for b in blocks if b.strip().startswith("-") and not b.strip().startswith("-h")
               and not any(word in " ".join(b.split()) for word in ("default", "required"))]
    assert missing == [], missing


@pytest.mark.parametrize("argv, words", [
    (["--set", "optim.lr='x"], "the value \"'x\" is not valid YAML"),
    (["--set", "optim.lr=[unclosed"], "the value '[unclosed' is not valid YAML"),
    (["--set", "optim.lr=1e400"], "the value '1e400' is out of range (it reads as inf); expected a finite number"),
    (["--set", "optim.lr=.inf"], "the value '.inf' reads as inf; expected a finite number"),
    (["--set", "data.synthetic_detail=.nan"], "the value '.nan' reads as nan; expected a finite number"),
    (["--config", "NONUTF8"], "cannot be read (invalid start byte); expected a readable UTF-8 YAML file"),
    (["--config", "FOLDER"], "config file is a folder:"),
    (["--config", "INF"], "invalid optim.weight_decay=inf: expected a finite number"),
    (["--config", "HPARAM_INF", "--variant", "expansion"], "invalid variant.hparams.lam=inf: expected a finite number"),
])
def test_a_bad_value_or_config_file_is_one_line(tmp_path, capsys, argv, words):
    """A --set value that is not YAML, a number beyond float range (it read as inf, past the
    finite check), a config file that is not UTF-8: tracebacks, or a run that diverged at once."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    (tmp_path / "inf.yaml").write_text("optim:\n  weight_decay: .inf\n")  # .inf passed the checks: trained
    (tmp_path / "hparam.yaml").write_text("variant:\n  hparams:\n    lam: .inf\n")
    argv = [{"NONUTF8": str(bad), "FOLDER": str(tmp_path), "INF": str(tmp_path / "inf.yaml"),
             "HPARAM_INF": str(tmp_path / "hparam.yaml")}.get(a, a) for a in argv]
    assert main(["config", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("carrot: error: ") and words in err, err
