"""MLflow tracking: one run per trial, one parent run per study, metrics logged in batches.

The store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/`` unless
``MLFLOW_TRACKING_URI`` is set (MLflow 3.13+ refuses the old plain-folder store).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from carrot import contract, interrupt
from carrot.config import UserError

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


_READY: set[str] = set()  # tracking URIs whose store this process has already opened


class StoreError(UserError, RuntimeError):
    """The tracking or study store cannot be used (unwritable, unreachable)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or contract.DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    db = contract.sqlite_file(uri)
    return Path(db) if db else None


def check_writable(path: Path, what: str) -> None:
    """Fail with one clear line when ``path`` (a folder) cannot be created or written. Creates
    nothing: a folder that does not exist yet counts as writable when the closest existing
    folder above it is."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".carrot-write-check"):
            pass
    except OSError as exc:
        raise StoreError(f"{what} is not writable: {path} ({exc.strerror or exc}); "
                         "expected a folder this user can write") from None


def artifact_root(uri: str) -> str | None:
    db = _sqlite_path(uri)
    return str(db.parent.resolve()) if db is not None else None


def check_store(create: bool = True) -> tuple[str, Path | None]:
    """Check, creating nothing, that the tracking store can be used: one line otherwise. Returns
    the tracking URI and its SQLite file (None for other stores). ``create=False``: a SQLite
    store that does not exist yet is an error (commands that only read runs)."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # importing mlflow set it to INFO
    interrupt.before_store()
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if contract.sqlite_file(uri) == "":
        raise StoreError(f"MLflow tracking URI {uri} is an in-memory SQLite database, which keeps no run after "
                         "the command; expected sqlite:///path/to/mlflow.db")
    if db is not None:
        if db.is_dir():  # MLflow would retry opening it for minutes
            raise StoreError(f"MLflow store {db} is a folder; expected the path of its SQLite database file, "
                             f"e.g. {contract.DEFAULT_TRACKING_URI}")
        if not create and not db.is_file():
            raise StoreError(f"no MLflow store at {db}; expected the store the runs were logged to "
                             "(MLFLOW_TRACKING_URI)")
        check_writable(db.parent, "MLflow store")
        if db.exists() and not os.access(db, os.W_OK):
            raise StoreError(f"MLflow store {db} is read-only; expected a database file this user can write "
                             "(or set MLFLOW_TRACKING_URI to another store)")
    elif uri in _READY:
        pass
    else:
        problem = contract.tracking_store_problem(uri)
        if problem:
            raise StoreError(problem)
    return uri, db


def client(create: bool = True) -> MlflowClient:
    """The tracking store's client, after :func:`check_store`."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri, db = check_store(create)
    mlflow.set_tracking_uri(uri)
    if db is not None and uri not in _READY:
        db.parent.mkdir(parents=True, exist_ok=True)
        # The first use of a fresh SQLite store creates its schema, and the client does it as
        # it is made: processes started together take turns (MLflow's own creation is not safe
        # against a concurrent one).
        from filelock import FileLock

        with FileLock(str(db.parent / ".carrot-schema.lock"), timeout=300):
            try:
                mlf = MlflowClient(tracking_uri=uri)
                mlf.search_experiments(max_results=1)
            except Exception as exc:  # a damaged file ("database disk image is malformed"), not SQLite
                raise StoreError(f"the MLflow store {db} cannot be read: {contract.first_line(exc)}; expected the SQLite database "
                                 "of an MLflow store (keep a copy of the file; `sqlite3 FILE .recover` may "
                                 "save its runs), or set MLFLOW_TRACKING_URI to another store") from None
    else:
        mlf = MlflowClient(tracking_uri=uri)
    _READY.add(uri)
    return mlf


def experiment_id(mlf: MlflowClient, name: str) -> str:
    exp = mlf.get_experiment_by_name(name)
    root = artifact_root(mlf.tracking_uri)
    if exp is not None:
        if contract.MLFLOW_EXPERIMENT_KIND not in exp.tags:
            mlf.set_experiment_tag(exp.experiment_id, contract.MLFLOW_EXPERIMENT_KIND, "custom_model_development")
        _note_foreign_artifacts(exp, root)
        return exp.experiment_id
    location = Path(root, "artifacts", name).as_uri() if root else None
    try:  # the UI opens a model-training experiment on its runs, not on GenAI traces
        return mlf.create_experiment(name, artifact_location=location,
                                     tags={contract.MLFLOW_EXPERIMENT_KIND: "custom_model_development"})
    except mlflow.exceptions.MlflowException:  # created by a concurrent process
        return mlf.get_experiment_by_name(name).experiment_id


_NOTED: set[tuple[str, str]] = set()


def _note_foreign_artifacts(exp, root: str | None) -> None:
    """Say once when an experiment of a copied or moved SQLite store keeps its artifact location
    in the original's folder: MLflow fixes it when the experiment is made, so new runs of the
    copy write their files there."""
    from urllib.parse import unquote, urlparse

    location = exp.artifact_location or ""
    if root is None or not location.startswith("file:") or (exp.name, root) in _NOTED:
        return
    folder = Path(unquote(urlparse(location).path))
    if folder.is_relative_to(root):
        return
    _NOTED.add((exp.name, root))
    print(f"carrot: note: experiment {exp.name!r} of the store in {root} keeps its runs' files in {folder}, outside "
          "that folder (the store was copied or moved), and new runs write there too; give another "
          "--experiment to keep a copy's new runs with it", file=sys.stderr)


def ui_base(uri: str | None = None) -> str:
    """The MLflow UI's address: the tracking server itself, or ``CARROT_UI_URL`` (default
    ``http://127.0.0.1:5000``, where ``make ui`` serves a local store)."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import re

        # a link carries no credentials: the user information runs to the authority's last "@"
        return re.sub(r"^(https?://)[^/]*@", r"\1", uri).rstrip("/")
    return os.environ.get("CARROT_UI_URL", "http://127.0.0.1:5000").rstrip("/")


# the UI shows the model-training pages (runs, metrics, charts), not the GenAI ones it opens by default
UI_VIEW = "?workflowType=machine_learning"


def run_url(mlf: MlflowClient, run_id: str, experiment: str | None = None) -> str:
    """The run's page in the MLflow UI (``experiment``: its experiment's id, if known)."""
    experiment = experiment or mlf.get_run(run_id).info.experiment_id
    return f"{ui_base(mlf.tracking_uri)}/#/experiments/{experiment}/runs/{run_id}{UI_VIEW}"


def experiment_url(mlf: MlflowClient, name: str) -> str:
    """The experiment's run list in the MLflow UI."""
    exp = mlf.get_experiment_by_name(name)
    if exp is None:
        return ui_base(mlf.tracking_uri)
    return f"{ui_base(mlf.tracking_uri)}/#/experiments/{exp.experiment_id}/runs{UI_VIEW}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of carrot's checkout (``-dirty`` with uncommitted changes to tracked files)
    when this process started using it: the code it runs was read then."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


_COMMITTER: tuple[int, ThreadPoolExecutor] | None = None  # (pid, executor) of this process
_COMMITTER_LOCK = threading.Lock()


def committer() -> ThreadPoolExecutor:
    """This process's one thread that commits metrics logged in the background, in the order
    they were logged.

    MLflow's own asynchronous queue (``log_batch(synchronous=False)``) polls for work once a
    second and ``set_terminated`` shuts it down, so every run's end waited up to a second (half
    a second on average) for that poll; this thread waits on its queue instead. A forked child
    gets a thread of its own."""
    global _COMMITTER
    with _COMMITTER_LOCK:
        if _COMMITTER is None or _COMMITTER[0] != os.getpid():
            _COMMITTER = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="carrot-metrics"))
        return _COMMITTER[1]


class RunLogger:
    """One MLflow run; metrics of one step go out in one ``log_batch`` call."""

    def __init__(self, mlf: MlflowClient, run_id: str, experiment_id: str | None = None) -> None:
        self.client = mlf
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._queued: list[Future] = []  # the commits of the metrics logged in the background

    @classmethod
    def start(cls, experiment: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> "RunLogger":
        mlf = client()
        all_tags = {contract.MLFLOW_RUN_NAME: name, **tags}
        if parent_run_id:
            all_tags[contract.MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = mlf.create_run(experiment_id(mlf, experiment), tags=all_tags, run_name=name)
        return cls(mlf, run.info.run_id, run.info.experiment_id)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any], metrics: dict[str, float] | None = None, step: int = 0) -> None:
        """The tags (and ``metrics`` at ``step``, if any) in one store write."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                              metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()])

    def log_metrics(self, metrics: dict[str, float], step: int, background: bool = False) -> None:
        """``background``: committed to the store on this process's :func:`committer` thread
        while the caller goes on; :meth:`flush` and :meth:`finish` wait for it."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_BATCH):
            batch = items[i:i + MAX_BATCH]
            if background:
                self._queued.append(committer().submit(self.client.log_batch, self.run_id, metrics=batch))
            else:
                self.client.log_batch(self.run_id, metrics=batch)

    def flush(self) -> None:
        """Wait for every metric logged in the background, then raise the first error the store
        raised (noting how many more failed). A commit leaves the queue only once it is done, so
        a wait that is interrupted leaves the rest for the next flush."""
        errors = []
        while self._queued:
            error = self._queued[0].exception()
            self._queued.pop(0)
            if error is not None:
                errors.append(error)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"{len(errors) - 1} more background metric commits failed")
            raise errors[0]

    def log_bytes(self, content: bytes, artifact_file: str) -> None:
        self.log_files({artifact_file: content})

    def log_files(self, files: dict[str, bytes | Any]) -> None:
        """Artifacts ``{path in the run: content}``, all in one upload: bytes as they are, anything
        else as JSON (indented, as MLflow's ``log_dict`` writes it)."""
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else json.dumps(content, indent=2).encode())
            self.client.log_artifacts(self.run_id, tmp)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)


def find_runs(mlf: MlflowClient, experiment: str, filter_string: str = "", order_by: Iterable[str] = ()) -> list:
    return contract.search_runs(mlf, experiment, filter_string, order_by)
