"""What a researcher sees: a small study and a final run on the real stores, read back through
MlflowClient and Optuna (descriptions, dataset inputs, system metrics, pictures, weights,
`carrot evaluate`, trial links), and the command line's quick answers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from conftest import tiny_config

VARIANT = "expansion"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An expansion study of 2 trials and one final run of its best trial, in a fresh store."""
    from carrot.final import run_final
    from carrot.study import run_study

    root = tmp_path_factory.mktemp("view")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        base = tiny_config(**{"variant.name": VARIANT, "optim.epochs": 2})
        storage = str(root / "studies" / "optuna.journal")
        summary = run_study(base, 2, storage, log=lambda s: None)
        run_final(base, seeds=1, variants=[VARIANT], storage=storage,
                  overrides={"optim.epochs": 2, "show_progress": False}, log=lambda s: None)
        yield root, storage, summary
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def _runs(root, role):
    client = _client(root)
    exp = client.get_experiment_by_name("carrot")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("carrot.role") == role]


def test_runs_describe_themselves(finished):
    root, _, summary = finished
    (final,) = _runs(root, "final")
    note = final.data.tags["mlflow.note.content"]
    acc = final.data.metrics["test/acc"]
    assert f"**{VARIANT}**" in note and summary.name in note and "finished after 2/2 epochs" in note
    assert f"| test accuracy | {100 * acc:.2f}% |" in note
    assert f"| linear probe (embedding) | {100 * final.data.metrics['probe/embedding/acc']:.2f}% |" in note
    for trial in _runs(root, "trial"):
        number = trial.data.tags["carrot.trial"]
        assert f"trial {number}" in trial.data.tags["mlflow.note.content"]
        assert f"{100 * trial.data.metrics['val/acc']:.2f}%" in trial.data.tags["mlflow.note.content"]
    (parent,) = _runs(root, "study")
    assert parent.info.run_name == summary.name  # the study's name in full
    client = _client(root)
    exp = client.get_experiment_by_name("carrot")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert final.data.tags["mlflow.source.name"] == "carrot final"
    commit = final.data.tags["carrot.git_commit"]
    if commit != "unknown":
        assert final.data.tags["mlflow.source.git.commit"] == commit.removesuffix("-dirty")


def test_params_are_the_resolved_hyperparameters(finished):
    root, _, _ = finished
    (final,) = _runs(root, "final")
    params = final.data.params
    assert "show_progress" not in params and "experiment" not in params
    assert params["device"] == "cpu"  # resolved, never "auto"
    assert params["variant.hparams.lam"]  # the variant's recommended values filled in


def test_dataset_inputs_carry_a_content_digest(finished):
    from carrot.data import build_dataset
    from carrot.model import create_backbone, image_spec
    from carrot.run_report import content_digest

    root, _, _ = finished
    runs = _runs(root, "final") + _runs(root, "trial")
    inputs = [{d.dataset.name: d for d in r.inputs.dataset_inputs} for r in runs]
    for run, found in zip(runs, inputs):  # the splits each run reads, in the role it reads them
        contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in found.items()}
        if run.data.tags["carrot.role"] == "final":  # trained on train+val, scored on test
            assert contexts == {"digits/train": "train", "digits/val": "train", "digits/test": "test"}
        else:
            assert contexts == {"digits/train": "train", "digits/val": "validation"}
    # every run of one dataset shows the same digests, and they are the splits' content
    for name in ("digits/train", "digits/val", "digits/test"):
        assert len({f[name].dataset.digest for f in inputs if name in f}) == 1
    cfg = tiny_config()
    splits = build_dataset(cfg.data, image_spec(create_backbone(cfg.model.backbone, False, None, 0.0, {})))
    assert inputs[0]["digits/test"].dataset.digest == content_digest(splits.test, splits.labels["test"])
    moved = tiny_config(**{"data.split_seed": 1})  # another partition: other content, other digests
    other = build_dataset(moved.data, image_spec(create_backbone(cfg.model.backbone, False, None, 0.0, {})))
    assert content_digest(other.test, other.labels["test"]) != inputs[0]["digits/test"].dataset.digest
    labels = splits.labels["test"].copy()
    labels[[0, 1]] = labels[[1, 0]] if labels[0] != labels[1] else (labels[0], (labels[1] + 1) % 10)
    assert content_digest(splits.test, labels) != content_digest(splits.test, splits.labels["test"])


def test_system_metrics_pictures_and_weights(finished):
    from matplotlib import colormaps
    from test_charts import heatmap_cells, parse

    from carrot import contract
    from carrot.run_report import CONFUSION_IMAGE, PAIRS_IMAGE, TRAJECTORY_IMAGE

    root, _, _ = finished
    client = _client(root)
    (final,) = _runs(root, "final")
    assert any(k.startswith("system/cpu_utilization_percentage") for k in final.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in final.data.metrics)
    for run in [final] + _runs(root, "trial"):
        names = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert names == {CONFUSION_IMAGE, PAIRS_IMAGE, TRAJECTORY_IMAGE}
        # their wall time, a part of the run's logging time; the Optuna trial's reports apart from it
        metrics = run.data.metrics
        assert 0 < metrics["time/pictures_s"] < metrics["time/logging_s"]
        assert (metrics["time/study_s"] > 0) == (run.data.tags[contract.TAG_ROLE] == contract.ROLE_TRIAL)
        assert metrics["time/logging_s"] + metrics["time/study_s"] < metrics["time/run_s"]
    # the picture in the store is the run's last confusion matrix, as logged in its npz
    picture = Path(client.download_artifacts(final.info.run_id, CONFUSION_IMAGE, str(root / "dl"))).read_text()
    with np.load(client.download_artifacts(final.info.run_id, contract.CONFUSION_ARTIFACT, str(root / "dl"))) as npz:
        last = npz["confusion"][-1]
    rates = last / np.maximum(last.sum(axis=1, keepdims=True), 1)
    assert np.array_equal(heatmap_cells(parse(picture), len(last)), colormaps["viridis"](rates, bytes=True)[..., :3])
    assert "weights.pt" in {a.path for a in client.list_artifacts(final.info.run_id)}
    assert not [r for r in _runs(root, "trial") if "weights.pt" in {a.path for a in client.list_artifacts(
        r.info.run_id)}]  # search trials keep no weights


def test_evaluate_reproduces_the_final_run_exactly(finished, monkeypatch):
    import torch

    from carrot.reevaluate import reevaluate

    root, _, _ = finished
    monkeypatch.chdir(root)
    (final,) = _runs(root, "final")
    metrics, differ, compared = reevaluate(final.info.run_id, log=lambda s: None)
    assert differ == {}
    assert compared >= 20  # accuracy, pair errors, cosines, D_B per layer, NC1, probes
    assert metrics["test/acc"] == final.data.metrics["test/acc"]
    assert metrics["probe/embedding/acc"] == final.data.metrics["probe/embedding/acc"]
    client = _client(root)
    # the tolerance is relative: a small value logged 0.1% off is a difference
    key = min((k for k in differ.keys() | metrics.keys() if k.startswith(("rho/", "proto_cos/"))
               and k in final.data.metrics and 0 < abs(final.data.metrics[k]) < 0.5),
              key=lambda k: abs(final.data.metrics[k]))
    step = client.get_metric_history(final.info.run_id, key)[-1].step
    client.log_metric(final.info.run_id, key, final.data.metrics[key] * 1.001, step=step)
    _, differ, _ = reevaluate(final.info.run_id, log=lambda s: None)
    assert list(differ) == [key]
    client.log_metric(final.info.run_id, key, final.data.metrics[key], step=step)
    # other weights: the same command reports the differences
    path = client.download_artifacts(final.info.run_id, "weights.pt", str(root / "w"))
    state = torch.load(path, weights_only=True)
    key = next(k for k in state if k.startswith("head") and k.endswith("weight"))
    state[key] = state[key] + 0.5 * torch.randn_like(state[key], generator=torch.Generator().manual_seed(0))
    torch.save(state, path)
    client.log_artifact(final.info.run_id, path)
    _, differ, _ = reevaluate(final.info.run_id, log=lambda s: None)
    assert "test/acc" in differ or "test/loss" in differ


def test_evaluate_on_a_split_the_run_trained_on_says_so(finished, monkeypatch):
    """A final run trains on train + val: its figures on val are not held-out ones."""
    from carrot.reevaluate import reevaluate

    root, _, _ = finished
    monkeypatch.chdir(root)
    (final,) = _runs(root, "final")
    for split, noted in (("val", True), ("test", False)):
        lines = []
        reevaluate(final.info.run_id, split=split, log=lines.append)
        note = ("note: the run trained on the val split (runs evaluated on test train on train + val), so these "
                "figures are not held-out ones")
        assert (note in lines) == noted, lines


def test_evaluate_needs_a_run_with_weights(finished, monkeypatch, capsys):
    from carrot.cli import main

    root, _, _ = finished
    monkeypatch.chdir(root)
    trial = _runs(root, "trial")[0]
    assert main(["evaluate", trial.info.run_id]) == 2
    assert main(["evaluate", "0" * 32]) == 2
    capsys.readouterr()
    (parent,) = _runs(root, "study")
    assert main(["evaluate", parent.info.run_id]) == 2
    assert "is a study's parent run" in capsys.readouterr().err
    client = _client(root)  # a final run that a signal stopped
    killed = client.create_run(parent.info.experiment_id, tags={"carrot.role": "final"}).info.run_id
    client.set_terminated(killed, status="KILLED")
    assert main(["evaluate", killed]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"carrot: error: run {killed} ended KILLED, so it has no trained model to re-evaluate; "
                   "expected a finished run (run `carrot final` again to finish it)"), err


def test_every_trial_links_its_run(finished):
    root, storage, summary = finished
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=summary.name, storage=JournalStorage(JournalFileBackend(storage)))
    assert study.metric_names == ["val/acc"]
    runs = {r.info.run_id: r for r in _runs(root, "trial")}
    exp = _client(root).get_experiment_by_name("carrot")
    assert len(study.trials) == 2
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        assert run_id in runs
        assert t.user_attrs["mlflow_run_url"] == (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/"
                                                  f"{run_id}?workflowType=machine_learning")
        stats = {k: v for k, v in t.user_attrs.items() if k.startswith("var/")}
        logged = {k: v for k, v in runs[run_id].data.metrics.items() if k.startswith("var/")}
        assert stats and stats == pytest.approx(logged)  # the variant's last statistics


def test_probes_follow_eval_probe():
    cfg = tiny_config()
    assert cfg.eval.probe == "last"  # every run that reaches its last epoch probes there
    final = tiny_config(**{"eval.probe": "final"})
    assert [final.eval.probes_at(e, 4, "val") for e in range(4)] == [False] * 4
    assert [final.eval.probes_at(e, 4, "test") for e in range(4)] == [False, False, False, True]
    every = tiny_config(**{"eval.probe": "every:2"})
    assert [every.eval.probes_at(e, 5, "val") for e in range(5)] == [False, True, False, True, True]
    assert [tiny_config(**{"eval.probe": "always"}).eval.probes_at(e, 3, "val") for e in range(3)] == [True] * 3
    assert [tiny_config(**{"eval.probe": "last"}).eval.probes_at(e, 3, "val") for e in range(3)] == [False,
                                                                                                      False, True]
    from carrot.config import ConfigError

    with pytest.raises(ConfigError, match="every:N"):
        tiny_config(**{"eval.probe": "every:0"})


# ----------------------------------------------------------------------------- the command line
def _cli(*argv: str) -> subprocess.CompletedProcess:
    code = ("import sys; from carrot.cli import main; code = main(sys.argv[1:]); "
            "print('heavy:', sorted(m for m in ('torch', 'timm', 'mlflow', 'optuna') if m in sys.modules)); "
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (("study", "--variant", "expansoin"), "unknown variant 'expansoin' (did you mean 'expansion'?)"),
    (("study", "--variant", "nosuch"), "unknown variant 'nosuch' (did you mean 'nuisance'?)"),
    (("train", "--dataset", "cubb"), "unknown dataset 'cubb' (did you mean 'cub'?)"),
    (("study", "--set", "optim.lrr=1"), "unknown config key(s) ['optim.lrr'] (did you mean 'optim.lr'?)"),
    (("train", "--epochs", "-1"), "invalid epochs=-1: expected a positive integer"),
    (("final", "--seeds", "0"), "invalid seeds=0: expected a positive integer"),
])
def test_input_errors_come_before_the_heavy_imports(argv, message):
    done = _cli(*argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"carrot: error: {message}")
    assert "heavy: []" in done.stdout  # nothing heavy was imported to find the mistake


def test_variants_table_shows_knobs_defaults_and_ranges():
    import contextlib
    import io
    import itertools

    from carrot.cli import main
    from carrot.variants import get_variant_class

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["variants"]) == 0
    lines = out.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("expansion "))
    block = [lines[start], *itertools.takewhile(lambda ln: ln.startswith(" "), lines[start + 1:])]
    rows = {ln[21:].split()[0]: ln for ln in block}
    cls = get_variant_class("expansion")
    lam = cls.full_search_space()["lam"]
    assert f"[{lam.low:g}, {lam.high:g}, log]" in rows["lam"]
    assert f" {cls.recommended()['lam']:g} " in rows["lam"]
    assert "{kl, supcon}" in rows["mode"]  # a categorical knob lists its choices
    assert set(rows) == set(cls.recommended()) | set(cls.full_search_space())


def test_config_show_prints_the_resolved_configuration(tmp_path):
    import yaml

    from carrot.config import RunConfig

    done = subprocess.run([sys.executable, "-m", "carrot.cli", "config", "--show", "--variant", "prototype",
                           "--resolve", "--set", "optim.lr=0.002", "--epochs", "3"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = RunConfig.from_dict(yaml.safe_load(done.stdout))
    assert shown.optim.lr == 0.002 and shown.optim.epochs == 3 and shown.variant.name == "prototype"
    expected = RunConfig.from_dict({"variant": {"name": "prototype"}, "optim": {"lr": 0.002, "epochs": 3}}).resolved()
    assert shown.to_dict() == expected.to_dict()
    assert shown.variant.hparams and shown.data.sampler != "auto"


def test_every_flag_has_help_with_its_default():
    import argparse

    from carrot.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for command, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.dest == "help" or command in ("tables", "plots", "bench"):
                continue
            if action.help == argparse.SUPPRESS:  # accepted only to be refused with a line of its own
                assert (command, action.dest) == ("final", "seed"), (command, action.option_strings)
                continue
            text = action.help or ""
            assert len(text) > 10, (command, action.option_strings)
            if not action.required:  # an optional flag says what happens without it
                assert "default" in text or "exactly one of" in text, (command, action.option_strings, text)
            checked += 1
    assert checked > 50


def test_final_help_offers_seeds_not_the_seed_it_refuses():
    """`carrot final --help` listed `--seed`, which final refuses (its runs use seeds 0 .. S-1)."""
    import argparse

    from carrot.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    final, train = sub.choices["final"].format_help(), sub.choices["train"].format_help()
    assert "--seeds SEEDS" in final and "--seed SEED" not in final
    assert "--seed SEED" in train


def test_epoch_metrics_logged_in_the_background_are_all_there_when_the_run_ends(tmp_path):
    """Per-epoch metrics are committed on the process's committer thread; ``finish`` waits for
    them before the run's status, so a finished run holds every step."""
    import time

    from conftest import module_store

    from carrot.tracking import RunLogger, committer

    with module_store(tmp_path) as (_, client):
        logger = RunLogger.start("background", "r", {})
        for step in range(1, 31):
            logger.log_metrics({"val/acc": step / 100, "train/loss": 1.0 / step}, step, background=True)
        statuses = []  # what the store said when the last queued commit ran

        def slow_last_commit():  # finish must wait for it before the status
            time.sleep(0.3)
            statuses.append(client.get_run(logger.run_id).info.status)

        logger._queued.append(committer().submit(slow_last_commit))
        logger.finish("FINISHED")
        assert statuses == ["RUNNING"]
        history = sorted(client.get_metric_history(logger.run_id, "val/acc"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(s, s / 100) for s in range(1, 31)]
        assert len(client.get_metric_history(logger.run_id, "train/loss")) == 30
        assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_a_background_commit_that_fails_is_raised_by_flush_after_the_others_landed(tmp_path):
    """A store error on the committer thread is not lost: ``flush`` raises the first, counts the
    others, and only once every queued commit has run."""
    import time

    from conftest import module_store
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from carrot.tracking import RunLogger, committer

    with module_store(tmp_path) as (_, client):
        logger = RunLogger.start("background", "r", {})
        gone = RunLogger(client, "0" * 32)  # no such run in the store
        gone.log_metrics({"val/acc": 0.5}, 1, background=True)
        gone.log_metrics({"val/acc": 0.6}, 2, background=True)

        def slow_commit():  # queued after the failing one
            time.sleep(0.3)
            client.log_batch(logger.run_id, metrics=[Metric("val/acc", 0.25, 0, 2)])

        gone._queued.append(committer().submit(slow_commit))
        with pytest.raises(MlflowException) as failed:
            gone.flush()
        assert failed.value.__notes__ == ["1 more background metric commits failed"]
        assert [m.value for m in client.get_metric_history(logger.run_id, "val/acc")] == [0.25]
        assert gone._queued == []


def test_a_runs_logging_time_covers_every_store_call_it_waited_for(tmp_path, monkeypatch):
    """``time/logging_s`` holds the wall time of every MLflow call the run made on its own
    thread (creation, params, inputs, tags, artifacts, pictures, the flush of the epochs'
    metrics) but its last two store writes, its closing tags with these metrics and its
    status. Timed here call by call through the real store."""
    import threading
    import time

    from conftest import module_store
    from mlflow.tracking import MlflowClient

    from carrot import train

    calls: list[tuple[str, float]] = []  # (method, seconds) of the calls on this thread
    main = threading.get_ident()
    for name in ("create_run", "log_batch", "log_inputs", "log_artifact", "log_artifacts", "get_run",
                 "set_terminated", "get_experiment_by_name"):
        method = getattr(MlflowClient, name)

        def timed(self, *args, _method=method, _name=name, **kwargs):
            began = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                if threading.get_ident() == main:
                    calls.append((_name, time.perf_counter() - began))

        monkeypatch.setattr(MlflowClient, name, timed)
    with module_store(tmp_path) as (_, client):
        result = train.run(tiny_config(), log=lambda s: None)
        metrics = client.get_run(result.run_id).data.metrics
    names = [name for name, _ in calls]
    end = names.index("set_terminated")  # what the caller does with the run after it ended is not its time
    assert names[end - 1] == "log_batch"
    waited = sum(seconds for _, seconds in calls[:end - 1])
    assert len(calls) > 10 and waited > 0
    assert waited <= metrics["time/logging_s"] <= metrics["time/run_s"]


def test_a_picture_that_cannot_be_drawn_costs_the_run_its_pictures_not_its_status(tmp_path, monkeypatch):
    from conftest import module_store

    from carrot import charts, contract, train
    from carrot.run_report import PICTURES_METRIC

    def broken(*args, **kwargs):
        raise ValueError("no picture today")

    monkeypatch.setattr(charts, "confusion_matrix", broken)
    with module_store(tmp_path) as (_, client):
        result = train.run(tiny_config(**{"optim.epochs": 1}), log=lambda s: None)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[contract.TAG_STATUS] == "finished"
        assert run.data.tags[contract.TAG_PICTURES_ERROR] == "ValueError: no picture today"
        assert not client.list_artifacts(result.run_id, "images") and PICTURES_METRIC not in run.data.metrics
        assert "time/logging_s" in run.data.metrics and "RUNNING" not in run.data.tags[contract.MLFLOW_NOTE]


@pytest.mark.parametrize("artifact", ["weights.pt", "config.json", "confusion.npz"])
def test_a_damaged_artifact_is_one_line_for_evaluate_and_a_note_for_the_tables(finished, monkeypatch, capsys,
                                                                              artifact, tmp_path):
    from urllib.parse import urlparse

    from carrot.cli import main

    root, storage, _ = finished
    monkeypatch.chdir(root)
    (final,) = [r for r in _runs(root, "final") if r.info.status == "FINISHED"]
    path = Path(urlparse(final.info.artifact_uri).path) / artifact
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut short, as a copy interrupted by a full disk leaves it
    try:
        capsys.readouterr()
        if artifact != "confusion.npz":
            assert main(["evaluate", final.info.run_id]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert err.startswith(f"carrot: error: run {final.info.run_id}: artifact {artifact} cannot be read ("), err
        else:  # the tables leave that run out where its matrix is needed, say so, and write the rest
            assert main(["tables", "--out", str(tmp_path), "--storage", storage]) == 0
            err = capsys.readouterr().err
            assert f"run {final.info.run_id}: artifact confusion.npz cannot be read (BadZipFile" in err, err
            assert "Traceback" not in err
            assert {p.name for p in tmp_path.glob("*.md")} >= {"main_results.md", "confusable_pairs.md",
                                                               "significance.md", "geometry.md"}
    finally:
        path.write_bytes(whole)


@pytest.mark.parametrize("artifact, content, words", [
    ("config.json", "[]", "artifact config.json cannot be read (ValueError: expected a mapping of config sections)"),
    ("config.json", '{"data": []}', "artifact config.json cannot be read (ValueError: expected a mapping"),
    ("config.json", "BACKBONE", "weights.pt does not fit the model of its config.json ("),
    ("pairs.json", "[]", "artifact pairs.json holds no list of class pairs under 'reference'"),
    ("pairs.json", '{"reference": 5}', "artifact pairs.json holds no list of class pairs under 'reference'"),
    ("pairs.json", '{"reference": [[0, 99]]}', "(expected [[i, j], ...] with 0 <= i != j < 10)"),
    ("pairs.json", None, "has no pairs.json, the reference pairs its pair metrics were computed on"),
])
def test_an_artifact_that_reads_but_does_not_fit_is_one_line_for_evaluate(finished, monkeypatch, capsys, artifact,
                                                                          content, words):
    """Artifacts that parse but hold something else (a list for the config, pairs beyond the
    classes, another backbone) gave tracebacks; a missing pairs.json was read as "no reference
    pairs", so the recomputed pair metrics differed and the run looked irreproducible."""
    import json
    from urllib.parse import urlparse

    from carrot.cli import main

    root, _, _ = finished
    monkeypatch.chdir(root)
    (final,) = [r for r in _runs(root, "final") if r.info.status == "FINISHED"]
    path = Path(urlparse(final.info.artifact_uri).path) / artifact
    whole = path.read_bytes()
    if content == "BACKBONE":
        data = json.loads(whole)
        data["model"]["backbone"] = "test_vit"
        content = json.dumps(data)
    try:
        if content is None:
            path.unlink()
        else:
            path.write_text(content)
        capsys.readouterr()
        assert main(["evaluate", final.info.run_id]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"carrot: error: run {final.info.run_id}"), err
        assert words in err, err
    finally:
        path.write_bytes(whole)
