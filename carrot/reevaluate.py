"""``carrot evaluate RUN_ID [--split test]``: rebuild a run's model from its logged
configuration and weights, recompute every diagnostic of its last epoch on a split, and
report where the result differs from what the run logged.

Only runs that kept their weights can be re-evaluated: final runs always do (``weights.pt``).
The reference pairs are the ones the run used (its ``pairs.json``), and the probes run when
the run logged probe accuracies, so every logged diagnostic has a recomputed counterpart.
On the same device and software the values match exactly; a value that differs by more
than ``--tolerance`` (default 1e-6, relative) is printed, and the exit status is 1.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

from carrot import contract
from carrot.config import ConfigError


def _read(run_id: str, local: Path, read: Callable[[Path], Any]) -> Any:
    """``read(local)``, or one line naming the run's artifact that cannot be read (cut short, damaged)."""
    try:
        return read(local)
    except Exception as exc:
        raise ConfigError(f"run {run_id}: artifact {local.name} cannot be read ({contract.error_line(exc)}); "
                          "it cannot be re-evaluated from it") from None


def _artifact(mlf, run_id: str, name: str, folder: str, problems: list[str]) -> Path | None:
    """One artifact of the run, found as the tables find it: where the run logged it or, in a
    store copied or moved as a whole, under the store's folder (where it was looked for goes
    to ``problems`` when it is found nowhere)."""
    from analysis.common import download_artifact

    return download_artifact(mlf, run_id, name, folder, problems=problems)


def reevaluate(run_id: str, split: str | None = None, device: str | None = None, tolerance: float = 1e-6,
               log: Callable[[str], None] = print) -> tuple[dict[str, float], dict[str, tuple[float, float]], int]:
    """(recomputed metrics, {key: (logged, recomputed)} for every key that differs, the number
    of keys compared: 0 when the run logged another split)."""
    import torch

    from carrot.config import RunConfig
    from carrot.evaluate import Evaluator
    from carrot.loaders import make_loader, trained_on
    from carrot.reference import ReferencePairs
    from carrot.tracking import client
    from carrot.train import build_run

    mlf = client(create=False)
    try:
        run = mlf.get_run(run_id)
    except Exception:
        raise ConfigError(f"no MLflow run {run_id!r} in {contract.redact(mlf.tracking_uri)}; expected the id of a "
                          "finished run (see `make ui` or the summary `carrot final` prints)") from None
    role = run.data.tags.get(contract.TAG_ROLE)
    if role == contract.ROLE_STUDY:
        raise ConfigError(f"run {run_id} is a study's parent run, which trains nothing; expected the id of a "
                          "final run (see `make ui` or the summary `carrot final` prints)")
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} ended {run.info.status}, so it has no trained model to re-evaluate; "
                          "expected a finished run (run `carrot final` again to finish it)")
    with tempfile.TemporaryDirectory() as tmp:
        problems: list[str] = []
        config = _artifact(mlf, run_id, contract.CONFIG_ARTIFACT, tmp, problems)
        weights = _artifact(mlf, run_id, contract.WEIGHTS_ARTIFACT, tmp, problems)
        pairs = _artifact(mlf, run_id, contract.PAIRS_ARTIFACT, tmp, problems)
        if problems:  # the artifact folder itself is missing or unreachable
            raise ConfigError(problems[0])
        if config is None:
            raise ConfigError(f"run {run_id} has no {contract.CONFIG_ARTIFACT}; it cannot be rebuilt")
        if weights is None:
            raise ConfigError(f"run {run_id} kept no {contract.WEIGHTS_ARTIFACT}; only final runs (`carrot final`) "
                              "keep their weights")
        if pairs is None:
            raise ConfigError(f"run {run_id} has no {contract.PAIRS_ARTIFACT}, the reference pairs its pair metrics "
                              "were computed on; it cannot be re-evaluated without them")

        def configuration(f: Path) -> RunConfig:
            data = json.loads(f.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("data", {}), dict):
                raise ValueError("expected a mapping of config sections")
            data.get("data", {}).pop("effective_batch_size", None)
            data["show_progress"] = False
            if device:
                data["device"] = device
            return RunConfig.from_dict(data)

        cfg = _read(run_id, config, configuration)
        state = _read(run_id, weights, lambda f: torch.load(f, map_location="cpu", weights_only=True))
        saved = _read(run_id, pairs, lambda f: json.loads(f.read_text()))
    parts = build_run(cfg)
    try:
        parts.model.load_state_dict(state)
    except Exception as exc:  # another backbone's weights, or a state dict of something else
        raise ConfigError(f"run {run_id}: {contract.WEIGHTS_ARTIFACT} does not fit the model of its "
                          f"{contract.CONFIG_ARTIFACT} ({contract.first_line(exc)}); it cannot be re-evaluated") from None
    reference = ReferencePairs.none()
    listed = saved.get(contract.PAIRS_REFERENCE_KEY) if isinstance(saved, dict) else None
    k = parts.splits.num_classes
    if not (isinstance(listed, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(c) is int and 0 <= c < k for c in p) and p[0] != p[1]
            for p in listed)):
        raise ConfigError(f"run {run_id}: artifact {contract.PAIRS_ARTIFACT} holds no list of class pairs under "
                          f"{contract.PAIRS_REFERENCE_KEY!r} (expected [[i, j], ...] with 0 <= i != j < {k}); "
                          "it cannot be re-evaluated from it")
    if listed:
        reference = ReferencePairs(listed, saved.get("reference_source", ""))
    split = split or cfg.split  # the split the run evaluated on: val for trials, test for final runs
    if split not in ("train", "val", "test"):
        raise ConfigError(f"invalid --split {split!r}: expected train, val or test")
    loader = make_loader(getattr(parts.splits, split), cfg, train=False, pin=parts.device.type == "cuda")
    logged = run.data.metrics
    probes = any(k.startswith("probe/") for k in logged)
    epochs = int(run.data.tags.get(contract.TAG_EPOCHS_DONE, cfg.optim.epochs) or cfg.optim.epochs)
    evaluator = Evaluator(cfg, parts.splits, split, parts.model, parts.device, reference)
    log(f"re-evaluating run {run_id} ({cfg.variant.name}, {cfg.data.dataset_id}, {cfg.model.backbone}) on the "
        f"{split} split ({len(parts.splits.labels[split])} samples) on {parts.device.type}"
        + (" with probes" if probes else ""))
    if split in trained_on(cfg.split):
        log(f"note: the run trained on the {split} split (runs evaluated on {cfg.split} train on "
            f"{' + '.join(trained_on(cfg.split))}), so these figures are not held-out ones")
    metrics = evaluator.evaluate(epochs - 1, loader, parts.probe_loader if probes else None,
                                 parts.amp_dtype if parts.use_amp else None)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("time/")}
    differ, compared = {}, 0
    if split == parts.eval_split:  # the run logged this split: compare every key it has
        for key, value in metrics.items():
            if key not in logged:
                continue
            compared += 1
            old = logged[key]
            # relative: a D_B near 1e2 and a rho near 1e-28 are both held to their own digits
            same = (math.isnan(old) and math.isnan(value)) or abs(old - value) <= tolerance * max(abs(old), abs(value))
            if not same:
                differ[key] = (old, value)
    return metrics, differ, compared


def main(run_id: str, split: str | None, device: str | None, tolerance: float) -> int:
    metrics, differ, compared = reevaluate(run_id, split, device, tolerance)
    for key in sorted(k for k in metrics if k.count("/") == 1 and k.endswith(("/acc", "/mean_class_acc"))):
        print(f"  {key} = {metrics[key]:.6f}")
    if differ:
        print(f"{len(differ)} of {compared} logged values differ (tolerance {tolerance:g}):")
        for key, (old, new) in sorted(differ.items()):
            print(f"  {key}: logged {old:.6g}, recomputed {new:.6g}")
        return 1
    if compared:
        print(f"all {compared} logged values of the last epoch recomputed exactly (tolerance {tolerance:g})")
    else:
        print(f"{len(metrics)} values computed; the run logged another split, so there is nothing to compare")
    return 0
