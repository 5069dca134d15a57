"""The names and formulas that the training side (``carrot``) and ``analysis`` share.

Tag keys, metric keys, artifact names, the study-name format, the default stores, and the
confusion-matrix formulas that both sides compute (confusable-pair scores, the top pairs, the
pair error). ``analysis`` imports this module and nothing else of ``carrot``, so a name
changes in one place. Only the standard library and NumPy are imported here.

>>> study_name("digits", "test_resnet", "expansion")
'digits-test_resnet-expansion'
>>> cm = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 10]])
>>> confusable_pairs(cm, top_n=20).tolist()      # only pairs that were confused
[[0, 1]]
>>> pair_error(cm, [[0, 1]]).round(3).tolist()
[0.15]
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Iterable

import numpy as np

# ----------------------------------------------------------------------------- stores
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "carrot"
DEFAULT_STORAGE = "studies/optuna.journal"
DEFAULT_OUT = "analysis/output"

# ----------------------------------------------------------------------------- run tags
TAG_PREFIX = "carrot."
TAG_VARIANT = "carrot.variant"
TAG_STUDY = "carrot.study"
TAG_STUDY_ID = "carrot.study_id"
TAG_TRIAL = "carrot.trial"
TAG_DATASET = "carrot.dataset"
TAG_BACKBONE = "carrot.backbone"
TAG_SEED = "carrot.seed"
TAG_SPLIT = "carrot.split"
TAG_ROLE = "carrot.role"  # study (a study's parent run), trial, final, train
TAG_GIT_COMMIT = "carrot.git_commit"
TAG_CONFIG_HASH = "carrot.config_hash"
TAG_NUM_CLASSES = "carrot.num_classes"
TAG_STATUS = "carrot.status"
TAG_EPOCHS_DONE = "carrot.epochs_done"
TAG_REF_PAIRS_SOURCE = "carrot.ref_pairs_source"
TAG_REF_PAIRS_PROBLEM = "carrot.ref_pairs_problem"
TAG_STUDY_STORAGE = "carrot.study_storage"
TAG_BEST_TRIAL = "carrot.best_trial"
TAG_BEST_RUN_ID = "carrot.best_run_id"
TAG_WORLD_SIZE = "carrot.world_size"
TAG_ERROR = "carrot.error"
TAG_PICTURES_ERROR = "carrot.pictures_error"  # why a run has no pictures, when drawing them failed
TAG_CHECKPOINT = "carrot.checkpoint"  # the run's checkpoint folder
TAG_RESUMED_FROM = "carrot.resumed_from"  # the checkpoint a retried trial started from
TAG_WORKER = "carrot.worker"  # the process that runs the run: {"host", "pid", "start"} as JSON
MLFLOW_NOTE = "mlflow.note.content"  # the run description in the MLflow UI
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_SOURCE_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens "custom_model_development" on its runs

ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
ROLE_FINAL = "final"
ROLE_TRAIN = "train"

SPLIT_VAL = "val"  # TAG_SPLIT of study trials: trained on train, evaluated on val
SPLIT_TEST = "test"  # TAG_SPLIT of final runs: trained on train+val, evaluated on test
REF_SOURCE_SELF_PREFIX = "self:"  # TAG_REF_PAIRS_SOURCE of a run scored on its own first-epoch pairs

# ----------------------------------------------------------------------------- parameters
HPARAM_PARAM_PREFIX = "variant.hparams."  # a variant hyperparameter's MLflow parameter: prefix + name

# ----------------------------------------------------------------------------- artifacts
CONFIG_ARTIFACT = "config.json"
DATASET_ARTIFACT = "dataset.json"
CONFUSION_ARTIFACT = "confusion.npz"
PAIRS_ARTIFACT = "pairs.json"
DIAGNOSTICS_ARTIFACT = "diagnostics.json"
WEIGHTS_ARTIFACT = "weights.pt"  # final runs: the trained model's state dict
# final runs: per-sample predictions on the test split, arrays ``index`` (N,) sample index in the
# split, ``label`` (N,), ``pred`` (N,), ``top5_class`` (N, 5) and ``top5_prob`` (N, 5), all of the
# last epoch
PREDICTIONS_ARTIFACT = "predictions.npz"
CONFUSION_KEY = "confusion"  # CONFUSION_ARTIFACT array: (E, K, K) counts, one matrix per epoch
PAIRS_REFERENCE_KEY = "reference"  # PAIRS_ARTIFACT field: the reference pairs, [[i, j], ...]

# ----------------------------------------------------------------------------- metric keys
TRAIN_PREFIX = "train/"
VARIANT_STAT_PREFIX = "var/"
TOP_ERROR = "pairs/top_error"
REF_ERROR = "pairs/ref_error"
PROTO_COS_TOP = "proto_cos/top_mean"
PROTO_COS_REF = "proto_cos/ref_mean"
PROTO_COS_OFFDIAG_MEAN = "proto_cos/offdiag_mean"
PROTO_COS_OFFDIAG_STD = "proto_cos/offdiag_std"
NC1 = "nc/nc1"
N_TOP = "pairs/n_top"  # how many real (S > 0) pairs the run's own top set holds
N_REF = "pairs/n_ref"  # how many pairs the reference set holds


def split_metric(split: str, name: str) -> str:
    """``split_metric("val", "acc")`` -> ``val/acc`` (``test/acc`` in final runs)."""
    return f"{split}/{name}"


def proto_cos_pair(i: int, j: int) -> str:
    return f"proto_cos/ref/{i}-{j}"


def rho_metric(layer: str, which: str) -> str:
    """``which`` is ``top`` or ``ref``."""
    return f"rho/{layer}/{which}_mean"


def db_metric(layer: str, which: str) -> str:
    """D_B = -log rho of a probed layer (``which``: ``top`` or ``ref``): finite where rho
    underflows to 0 on wide layers."""
    return f"dB/{layer}/{which}_mean"


def legacy_db_metric(layer: str, which: str) -> str:
    """The key older runs logged D_B under before :func:`db_metric` (``which``: ``top`` or
    ``ref``); ``analysis`` reads it where a run has no ``dB/`` key."""
    return f"bhattacharyya/{layer}/{which}_distance"


def probe_metric(layer: str) -> str:
    return f"probe/{layer}/acc"


# ----------------------------------------------------------------------------- studies
# config keys a study searches besides the variant's hyperparameters: they differ between the
# trials of one study, and between the best configurations of two variants by design
SEARCHED_CONFIG_KEYS = ("optim.lr", "optim.weight_decay", "data.sampler", "data.m_per_class")

TRIAL_RUN_URL_ATTR = "mlflow_run_url"  # the Optuna user attr linking a trial to its run in the MLflow UI
STUDY_ID_ATTR = "study_id"  # the Optuna user attr holding a study's unique id (TAG_STUDY_ID on its runs)
TRIAL_RUN_ID_ATTR = "mlflow_run_id"  # an Optuna trial's user attr: its MLflow run, set when the run starts


def study_name(dataset: str, backbone: str, variant: str) -> str:
    """The default study name of one (dataset, backbone, variant)."""
    return f"{dataset}-{backbone}-{variant}"


def file_name(name: str) -> str:
    """A study name as one file or folder name: itself when it is already a short, plain name;
    otherwise its letters, digits, dots, dashes and underscores (others become ``_``), at most
    80 of them, and a digest of the whole name, so that two names never share a file and no
    name (``a/b``, ``../x``, 300 characters) reaches outside its folder or past the file
    system's limit."""
    import hashlib

    plain = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    if plain == name and not name.startswith("."):
        return name
    return f"{plain.lstrip('.') or 'study'}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- confusion maths
def pair_scores(cm: np.ndarray) -> np.ndarray:
    """Symmetric confusability S (K, K) float64: S_ij = (C_ij / n_i + C_ji / n_j) / 2 with n_i
    the samples of class i (rows of C are true classes); an empty class contributes 0, and the
    diagonal is 0."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum(axis=1, keepdims=True)  # (K, 1)
    rates = np.divide(cm, n, out=np.zeros_like(cm), where=n > 0)  # (K, K) C_ij / n_i
    np.fill_diagonal(rates, 0.0)
    return (rates + rates.T) / 2


def confusable_pairs(cm: np.ndarray, top_n: int = 20, include_zero: bool = False) -> np.ndarray:
    """The top-``top_n`` unordered pairs (i < j) by :func:`pair_scores`, as (P, 2) int64.

    Order: S descending, ties broken by i then j. A pair with S_ij = 0 (never confused) is not
    returned unless ``include_zero``, which fills up to min(top_n, K (K - 1) / 2) pairs with
    zero-score pairs in index order.
    """
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    scores = pair_scores(cm)
    i, j = np.triu_indices(scores.shape[0], k=1)  # row-major, so a stable sort keeps the tie-break
    s = scores[i, j]  # (M,)
    order = np.argsort(-s, kind="stable")  # (M,)
    n = min(top_n, order.size)
    if not include_zero:
        n = min(n, int((s > 0).sum()))
    keep = order[:n]
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64).reshape(-1, 2)  # (P, 2)


def pair_error(cm: np.ndarray, pairs: Iterable[Iterable[int]]) -> np.ndarray:
    """e_ij = (C_ij + C_ji) / (n_i + n_j) per pair (P,) float64: the share of the two classes'
    samples mistaken for the other class of the pair; NaN when both classes are empty."""
    cm = np.asarray(cm, dtype=np.float64)
    pairs = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64).reshape(-1, 2)
    n = cm.sum(axis=1)  # (K,)
    i, j = pairs[:, 0], pairs[:, 1]
    swaps = cm[i, j] + cm[j, i]  # (P,)
    den = n[i] + n[j]  # (P,)
    return np.divide(swaps, den, out=np.full(len(pairs), np.nan), where=den > 0)


# ----------------------------------------------------------------------------- stores
def sqlite_file(url: str) -> str | None:
    """The database file of a ``sqlite:///path`` URL (tracking URI or study storage); ``""`` for
    an in-memory one (``sqlite://``, ``sqlite:///:memory:``, or ``sqlite://name`` with two
    slashes); None for any other URL."""
    if not url.startswith("sqlite:"):
        return None
    db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    return "" if db == ":memory:" or db.startswith("file::memory:") else db


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy tracking stores besides SQLite


def tracking_store_problem(uri: str, timeout: float = 10.0) -> str | None:
    """Why the tracking server or database at ``uri`` cannot be used, in one line (its password
    masked), or None when it answers within ``timeout`` seconds (MLflow itself retries an absent
    one for minutes and then raises a traceback), or that it is no tracking store at all (a
    folder, an unknown scheme). SQLite URLs are checked by the callers."""
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("file:") else ""
    expected = "expected sqlite:///path/to/mlflow.db, an http(s):// tracking server or a database URL (postgresql://)"
    if scheme in ("", "file"):  # MLflow 3 no longer writes runs to a folder store
        return redact(f"MLflow tracking URI {uri}: a folder store is not supported; {expected}", uri)
    if scheme not in ("http", "https", "databricks") and scheme.split("+")[0] not in DATABASE_SCHEMES:
        return redact(f"MLflow tracking URI {uri}: unknown scheme {scheme!r}; {expected}", uri)
    if scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except requests.RequestException as exc:
            return redact(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); "
                          "expected a running `mlflow server` at the tracking URI (MLFLOW_TRACKING_URI)", uri)
        return None
    if scheme.split("+")[0] not in DATABASE_SCHEMES:
        return None
    import sqlalchemy

    args = {"connect_timeout": int(timeout)} if scheme.split("+")[0] in ("postgresql", "mysql") else {}
    engine = None
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        with engine.connect():
            pass
    except Exception as exc:
        hint = (f"; for psycopg 3 write {scheme.split('+')[0]}+psycopg://"
                if isinstance(exc, ModuleNotFoundError) and scheme == "postgresql" else "")
        return redact(f"MLflow store {uri} cannot be opened: {first_line(exc)}{hint}; expected a "
                      "reachable database at the tracking URI (MLFLOW_TRACKING_URI)", uri)
    finally:
        if engine is not None:
            engine.dispose()
    return None


# ----------------------------------------------------------------------------- secrets
_SECRET_URLS: set[str] = set()  # the command's storage URLs: redact masks their passwords in every text


def remember_url(url: str | None) -> None:
    """Have every later :func:`redact` mask this URL's password too (a command's ``--storage``)."""
    if url:
        _SECRET_URLS.add(url)


def redact(text: str, *urls: str) -> str:
    """``text`` with the password of every URL in it (and of ``urls``) replaced by ``***``:
    ``postgresql://alice:s3cret@host/db`` -> ``postgresql://alice:***@host/db``. Also masks
    ``token=`` / ``password=`` query values.

    In the text, a password runs to the last "@" before the next "/" or space. The password of
    a URL in ``urls``, of one given to :func:`remember_url` (the command's storage URL) and of
    ``MLFLOW_TRACKING_URI`` is known whole: everything between
    ``user:`` and the URL's last "@", even with "/", spaces or "@" in it, and it is masked
    wherever it appears, percent-decoded too, and so is what follows each "@" in it, when four
    characters or more (a driver that splits the URL at the first "@" names the rest as the
    host)."""
    import re
    from urllib.parse import unquote

    # the user information runs to the authority's last "@" (a password may hold a raw "@")
    userinfo = r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)([^/\s]*)(@)"
    secrets = set()
    for url in (*urls, *_SECRET_URLS, os.environ.get("MLFLOW_TRACKING_URI", "")):
        m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:(.*)@", url or "", re.DOTALL)
        if m and m.group(1):
            password = m.group(1)
            for known in (password, unquote(password)):
                secrets.add(known)
                tails = ["@".join(known.split("@")[k:]) for k in range(1, known.count("@") + 1)]
                # a driver names what follows an "@" as the host, up to a "/", ":" or space
                hosts = [re.split(pattern, tail)[0] for tail in tails for pattern in (r"[/:\s]", r"[/:]", "/")]
                secrets.update(t for t in tails + hosts if len(t) >= 4)  # shorter: every such word in the text
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(userinfo, r"\1***\3", text)
    return re.sub(r"(?i)((?:password|passwd|token|secret)=)[^&\s]+", r"\1***", text)


# ----------------------------------------------------------------------------- run search
def search_runs(client, experiment_name: str, filter_string: str = "", order_by: Iterable[str] = ()) -> list:
    """Every active run of the experiment that matches ``filter_string``, all pages.

    ``client`` is an ``mlflow.tracking.MlflowClient``; the one run search of both sides.
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=filter_string,
                                  order_by=list(order_by), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when there is no message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def int_argument(low: int | None = None):
    """An argparse type: an integer (at least ``low`` where given); anything else is one error
    line naming what is expected."""
    expected = "an integer" if low is None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one line for a bad argument (the usage block goes to ``--help``), as every
    other bad input gets, and any password in it masked."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {redact(message)} (see `{self.prog} --help`)\n")
