"""Bad input in an empty folder: one line, exit 2, and the folder stays empty (no MLflow
database, no study journal, no lock file), because every check runs before a store is made."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch

from carrot.cli import main


@pytest.fixture()
def empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    return tmp_path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("carrot: error:"), err
    return err


CASES = [
    (["worker", "--study-name", "nope", "--trials", "1"], ["no Optuna storage", "studies/optuna.journal"]),
    (["worker", "--study-name", "nope", "--trials", "-1"], ["--trials -1", "positive integer"]),
    (["worker", "--study-name", "nope", "--until", "0"], ["--until 0", "positive integer"]),
    (["worker", "--study-name", "nope", "--trials", "1", "--storage", "sqlite:///x.db"],
     ["no Optuna storage at sqlite:///x.db"]),
    (["worker", "--study-name", "nope", "--trials", "1", "--device", "tpu"], ["--device 'tpu'", "cpu"]),
    (["study", "--trials", "1", "--storage", "sqlite://"], ["in-memory", "sqlite:///"]),
    (["study", "--trials", "1", "--storage", "sqlite:///:memory:"], ["in-memory"]),
    (["study", "--trials", "1", "--storage", "notadb://x"], ["cannot open Optuna storage notadb://x"]),
    (["final", "--seeds", "1", "--variant", "expansoin"], ["did you mean 'expansion'?"]),
    (["final", "--seeds", "1", "--backbone", "resnet5O"], ["did you mean 'resnet50'?"]),
    (["final", "--seeds", "1"], ["no Optuna storage"]),
    (["final", "--seeds", "1", "--seed", "3"], ["--seed 3 has no effect on final runs", "expected --seeds S"]),
    (["final", "--seeds", "1", "--set", "seed=3"], ["--set seed=3 has no effect on final runs"]),
    (["evaluate", "deadbeef"], ["no MLflow store", "mlflow.db"]),
    (["train", "--set", "optim.grad_clip=-1"], ["optim.grad_clip=-1", "> 0", "null"]),
    (["train", "--set", "optim.momentum=-1"], ["optim.momentum=-1", "[0, 1)"]),
    (["train", "--set", "model.drop_rate=-0.5"], ["model.drop_rate=-0.5", "[0, 1)"]),
    (["train", "--set", "eval.probe_l2_grid=[]"], ["eval.probe_l2_grid=[]", "non-empty list"]),
    (["train", "--set", "eval.probe_l2_grid=[0.1, -1]"], ["eval.probe_l2_grid", "positive numbers"]),
    (["config", "--show", "--variant", "expansion", "--set", "variant.hparams.lamm=0.5"], ["'lamm'", "valid"]),
    (["config", "--show", "--backbone", "resnet5"], ["unknown backbone 'resnet5'"]),
    # arguments the backbone does not take: a study ran, its trial failed without an MLflow run
    (["study", "--trials", "1", "--set", "model.kwargs={foo: 1}"], ["cannot create backbone 'test_resnet'", "'foo'"]),
    (["train", "--set", "model.kwargs={foo: 1}"], ["cannot create backbone 'test_resnet'", "'foo'"]),
    # --variant all with --set variant.name studied that one variant seven times
    (["study", "--trials", "1", "--variant", "all", "--set", "variant.name=expansion"],
     ["--set variant.name=expansion and --variant all both name the variant"]),
    # a DDP batch that the ranks cannot share: said once, before torchrun starts k processes
    (["train", "--nproc", "3", "--device", "cpu"], ["data.batch_size=64 for 3 DDP processes", "multiple of 3"]),
    (["train", "--nproc", "2", "--device", "cpu", "--set", "data.sampler=pk", "--batch-size", "12"],
     ["data.batch_size=12 for 2 DDP processes", "multiple of 8"]),
    (["study", "--nproc", "3", "--trials", "1"], ["data.batch_size=64 for 3 DDP processes", "multiple of 12"]),
]
if shutil.which("srun") is None:
    CASES.append((["study", "--trials", "1", "--launcher", "slurm"], ["--launcher slurm", "srun"]))


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_creates_nothing(empty, capsys, argv, expected):
    code = main(argv + (["--no-progress"] if argv[0] in ("study", "worker", "final", "train") else []))
    err = _one_line(capsys)
    assert code == 2
    for word in expected:
        assert word in err, (word, err)
    assert sorted(p.name for p in empty.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["study", "--trials", "1"], ["train"], ["final", "--seeds", "1"],
                                     ["worker", "--study-name", "x", "--trials", "1"]])
def test_cuda_without_a_gpu_creates_nothing(empty, capsys, command):
    assert main(command + ["--device", "cuda", "--no-progress"]) == 2
    assert "no CUDA device" in _one_line(capsys)
    assert sorted(p.name for p in empty.iterdir()) == []


def test_an_unreachable_database_tracking_store_is_one_line_without_its_password(empty, capsys, monkeypatch):
    """MLflow itself retries a database it cannot reach for minutes, then raises a traceback."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://alice:se/cr et@127.0.0.1:1/db")
    start = time.monotonic()
    assert main(["study", "--trials", "1", "--epochs", "1", "--no-progress"]) == 2
    assert time.monotonic() - start < 60
    err = _one_line(capsys)
    assert "MLflow store postgresql://alice:***@127.0.0.1:1/db cannot be opened" in err
    assert "se/cr" not in err and "cr et" not in err
    assert sorted(p.name for p in empty.iterdir()) == []


def test_a_config_file_names_the_study_variant(tmp_path):
    """`carrot study --config` runs the variant the file names (the flag wins when given)."""
    from carrot.cli import _variants_arg, build_config, build_parser

    path = tmp_path / "c.yaml"
    path.write_text("variant: {name: prototype, hparams: {lam: 0.5}}\n")
    args = build_parser().parse_args(["study", "--config", str(path)])
    configs = [build_config(args, v) for v in _variants_arg(args.variant)]
    assert [(c.variant.name, c.variant.hparams) for c in configs] == [("prototype", {"lam": 0.5})]
    args = build_parser().parse_args(["study", "--config", str(path), "--variant", "expansion",
                                      "--set", "variant.hparams={}"])
    assert [c.variant.name for c in (build_config(args, v) for v in _variants_arg(args.variant))] == ["expansion"]
    assert build_config(build_parser().parse_args(["study"]), None).variant.name == "baseline"


RACE = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
from carrot.tracking import client, experiment_id
experiment_id(client(), "carrot")
print("ok")
"""


def test_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    """The first use of a SQLite store creates its schema as the client is made; several
    commands started together on a fresh machine take turns instead of failing with "table
    already exists" or a migration error."""
    env_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    go = tmp_path / "go"
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(go)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(4.0)  # every process has imported mlflow and waits for the start
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_evaluate_needs_a_finite_non_negative_tolerance(empty, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "0" * 32, "--tolerance", value])
    assert exc.value.code == 2
    assert "--tolerance: expected a finite number >= 0" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in empty.iterdir()) == []


def test_tables_and_plots_refuse_an_output_path_that_is_a_file(store, capsys):
    from analysis.plots import main as plots_main
    from analysis.tables import main as tables_main
    from carrot.tracking import client

    client()  # an empty MLflow store
    (store / "afile").write_text("x")
    for command, prog in ((tables_main, "carrot tables"), (plots_main, "carrot plots")):
        assert command(["--out", str(store / "afile")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"{prog}: error: --out {store / 'afile'} cannot be a folder of results (File exists); "
                       "expected a folder this user can write"), err


def test_tables_and_plots_name_an_unreachable_server_without_its_password(store, capsys):
    from analysis.plots import main as plots_main
    from analysis.tables import main as tables_main

    uri = "http://u:secretpw9@127.0.0.1:9/"
    for command in (tables_main, plots_main):
        assert command(["--tracking-uri", uri, "--out", str(store / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "http://u:***@127.0.0.1:9/ is unreachable" in err, err
    db = "postgresql://u:secretpw9@127.0.0.1:1/db"  # MLflow retried it for two minutes, then a traceback
    for command in (tables_main, plots_main):
        assert command(["--tracking-uri", db, "--out", str(store / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "MLflow store postgresql://u:***@127.0.0.1:1/db cannot be opened" in err, err
    assert not (store / "out").exists()


def test_a_mistyped_filter_does_not_overwrite_the_results(store, capsys):
    """`carrot tables --dataset digit` wrote empty tables over the good ones."""
    from analysis.plots import main as plots_main
    from analysis.tables import main as tables_main
    from carrot.tracking import client, experiment_id

    mlf = client()
    mlf.create_run(experiment_id(mlf, "carrot"), tags={"carrot.dataset": "digits", "carrot.backbone": "test_resnet",
                                                       "carrot.role": "final", "carrot.variant": "baseline"})
    out = store / "out"
    out.mkdir()
    (out / "main_results.md").write_text("the good table")
    for command, prog in ((tables_main, "carrot tables"), (plots_main, "carrot plots")):
        assert command(["--dataset", "digit", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"{prog}: error: --dataset digit: no run of experiment 'carrot' has it (did you mean 'digits'?); "
            "expected one of: digits")
        # a mistyped value beside a good one left its slice out without a word
        assert command(["--dataset", "digits", "--dataset", "digit", "--out", str(out)]) == 2
        assert "--dataset digit: no run of experiment 'carrot' has it" in capsys.readouterr().err
        # a mistyped experiment wrote empty tables over the good ones too, and exited 0
        assert command(["--experiment", "carot", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"{prog}: error: --experiment carot: no such experiment in the store (did you mean 'carrot'?); "
            "expected one of: carrot")
        with pytest.raises(SystemExit) as stop:  # an empty --out wrote the results into the current folder
            command(["--out", ""])
        assert stop.value.code == 2
        assert "argument --out: expected a folder for the results, got an empty path" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["main_results.md"]
    assert sorted(p.name for p in store.iterdir()) == ["mlruns", "out"]
    assert (out / "main_results.md").read_text() == "the good table"


@pytest.mark.slow
def test_a_training_run_creates_no_study_storage(empty, capsys):
    """`carrot train` looks for the baseline study's reference pairs; where there is no study
    storage it says so and creates none (it left an empty studies/optuna.journal)."""
    assert main(["train", "--epochs", "1", "--image-size", "16", "--no-progress"]) == 0
    assert "no baseline study 'digits-test_resnet-baseline' yet" in capsys.readouterr().out
    assert sorted(p.name for p in empty.iterdir()) == ["mlruns"]


@pytest.mark.parametrize("argv, words", [
    (["study", "--storage", "adir", "--trials", "1"], "--storage adir is a folder; expected the path of a journal"),
    (["study", "--seed", str(2**32), "--trials", "1"], "invalid seed=4294967296: expected an integer from 0 to 2**32"),
    (["worker", "--study-name", "s", "--trials", "1", "--worker-index", "-1"], "expected an integer >= 0, got '-1'"),
])
def test_a_folder_as_storage_a_seed_beyond_numpy_or_a_negative_worker_index_is_one_line(empty, capsys, argv,
                                                                                       words):
    """A folder as --storage trained a trial, then IsADirectoryError; a seed of 2**32 or more, or a
    negative worker index (it moves the sampler's seed), numpy's ValueError traceback."""
    (empty / "adir").mkdir()
    try:
        code = main(argv + ["--epochs", "1", "--no-progress"] if argv[0] == "study" else argv)
    except SystemExit as exc:  # argparse's own exit, after its one line
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in empty.iterdir()) == ["adir"] and not list((empty / "adir").iterdir())


def test_more_jobs_than_trials_start_one_worker_per_trial(empty, capsys):
    """`--jobs 3 --trials 1` ran three trials (each worker one); `--jobs 99999` forked until the
    machine gave out."""
    import optuna

    from carrot.study import open_storage

    argv = ["study", "--trials", "1", "--jobs", "3", "--epochs", "1", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    assert main(argv) == 0
    assert "carrot: --jobs 3 is more than --trials 1: starting 1 worker(s)" in capsys.readouterr().err
    study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=open_storage(None))
    assert len(study.trials) == 1


def test_any_study_name_is_one_file_inside_the_studies_folder(tmp_path):
    """A study name becomes the name of its lock (and of its workers' log and Slurm folders):
    `a/../../x` put the lock outside studies/, and a 300-character name failed with "File name
    too long" after the stores were made."""
    from pathlib import Path

    from carrot.contract import file_name
    from carrot.study import study_lock

    folder = tmp_path / "studies"
    names = ["digits-test_resnet-baseline", "a/b", "a_b", "a/../../../x", "../x", ".hidden", "n" * 300, "é"]
    locks = []
    for name in names:
        lock = study_lock(str(folder / "optuna.journal"), name)
        path = Path(lock.lock_file)
        assert path.parent == folder and len(path.name.encode()) < 255, (name, path)
        with lock:
            assert path.exists()
        locks.append(path.name)
    assert len(set(locks)) == len(names)  # no two names share a lock
    assert file_name("digits-test_resnet-baseline") == "digits-test_resnet-baseline"  # plain names kept
    assert sorted(p.parent for p in tmp_path.rglob("*")) == [tmp_path] + [folder] * len(names)


@pytest.mark.parametrize("weights, words", [
    ("missing.pt", "pretrained weights file not found: missing.pt (expected a state-dict file)"),
    ("notes.txt", "cannot load the pretrained weights notes.txt into backbone 'test_resnet': "),
    ("other.pt", "none of the weights of backbone 'test_resnet' are in other.pt: every one kept its initialisation"),
])
def test_a_bad_pretrained_weights_file_is_one_line_before_the_stores(empty, capsys, weights, words):
    """A missing or unloadable --pretrained-path failed once the run was being built, after the
    MLflow store had been created; a state dict of another model trained from random weights."""
    (empty / "notes.txt").write_text("not weights\n")
    torch.save({"fc.weight": torch.zeros(3, 3)}, empty / "other.pt")  # a state dict of another model
    for command in (["train"], ["study", "--trials", "1"]):
        assert main(command + ["--pretrained-path", weights, "--epochs", "1", "--no-progress"]) == 2
        err = _one_line(capsys)
        assert err.startswith(f"carrot: error: {words}"), err
        assert err.endswith("(expected a state-dict file)" if weights == "missing.pt"
                            else "; expected a state-dict file of that model"), err
        assert sorted(p.name for p in empty.iterdir()) == ["notes.txt", "other.pt"]


def test_a_worker_on_a_study_carrot_did_not_start_is_one_line_before_the_stores(empty, capsys):
    """`carrot worker` on a study without a stored configuration said so only after it had
    created the MLflow store."""
    import optuna

    from carrot.study import open_storage

    optuna.create_study(study_name="foreign", storage=open_storage(None))
    assert main(["worker", "--study-name", "foreign", "--trials", "1"]) == 2
    assert "study 'foreign' has no stored configuration" in _one_line(capsys)
    assert sorted(p.relative_to(empty).as_posix() for p in empty.rglob("*")) == ["studies", "studies/optuna.journal"]


@pytest.mark.parametrize("uri, words", [
    ("sqlite://", "MLflow tracking URI sqlite:// is an in-memory SQLite database, which keeps no run after"),
    ("sqlite:///:memory:", "is an in-memory SQLite database"),
    ("sqlite:///adir", "MLflow store adir is a folder; expected the path of its SQLite database file"),
])
def test_a_tracking_uri_that_keeps_nothing_or_names_a_folder_is_one_line(empty, capsys, monkeypatch, uri, words):
    """An in-memory SQLite tracking URI was called an unknown scheme; one naming a folder was
    retried by MLflow for two minutes, then a traceback."""
    (empty / "adir").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for argv in (["train"], ["study", "--trials", "1"]):
        assert main(argv + ["--epochs", "1", "--no-progress"]) == 2
        assert words in _one_line(capsys)
    assert sorted(p.name for p in empty.rglob("*")) == ["adir"]
