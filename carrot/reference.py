"""Reference pairs: the confusable pairs every variant of a dataset is scored on.

Defined, never "the newest run's": for study trials, the top-N pairs of the **best** trial of
the matching baseline study (same storage, dataset, backbone and label set), fixed when the
first trial of a non-baseline study starts and recorded on the study (user attr
``reference_pairs``) and on every run (tag ``carrot.ref_pairs_source``). Final runs take the
same pairs; the paper tables recompute their own from the pooled confusion matrices of the
baseline's final runs. Without a finished baseline study a run scores its own first real pairs
(``self:epochN``), and says so. The caller resolves the pairs once and hands them to each run;
the evaluation never searches a store itself. A look-up that fails is reported and tagged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from carrot import contract
from carrot.config import RunConfig

STUDY_ATTR = "reference_pairs"


@dataclass(frozen=True)
class ReferencePairs:
    pairs: list[list[int]] | None  # None: the run uses its own first pairs
    source: str = ""  # where the pairs came from: study:<id>/trial:<n>/run:<id>
    problem: str = ""  # why there are none (no baseline study yet, a failed look-up)

    @classmethod
    def none(cls, problem: str = "") -> "ReferencePairs":
        return cls(None, problem=problem)


def count_classes(cfg: RunConfig) -> int:
    """The number of classes of ``cfg``'s dataset (builds its index, decodes no image)."""
    from carrot.data import ImageSpec, build_dataset

    return build_dataset(cfg.data, ImageSpec(input_size=cfg.data.image_size or 224)).num_classes


def best_baseline_pairs(cfg: RunConfig, storage, num_classes: int) -> ReferencePairs:
    """Top-N pairs of the best complete trial (highest value; ties: lowest validation loss, then
    the parameters) of the baseline study of ``cfg``'s dataset and backbone in ``storage``, on the same label set."""
    import optuna

    from carrot.tracking import client

    name = contract.study_name(cfg.data.dataset_id, cfg.model.backbone, "baseline")
    if storage is None:  # no study storage at all
        return ReferencePairs.none(f"no baseline study {name!r} yet (run `make study VARIANT=baseline` first)")
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return ReferencePairs.none(f"no baseline study {name!r} yet (run `make study VARIANT=baseline` first)")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get(contract.TRIAL_RUN_ID_ATTR)]
    if not complete:
        return ReferencePairs.none(f"baseline study {name!r} has no complete trial yet")
    mlf = client()
    top_value = max(t.value for t in complete)
    tied = [t for t in complete if t.value == top_value]

    def tie_break(t):  # not the trial number: that depends on the order trials finished in
        loss = mlf.get_run(t.user_attrs[contract.TRIAL_RUN_ID_ATTR]).data.metrics.get(contract.split_metric("val", "loss"))
        return (float("inf") if loss is None else loss, json.dumps(t.params, sort_keys=True, default=str))

    best = min(tied, key=tie_break)
    run_id = best.user_attrs[contract.TRIAL_RUN_ID_ATTR]
    run = mlf.get_run(run_id)
    if run.data.tags.get(contract.TAG_NUM_CLASSES) != str(num_classes):
        return ReferencePairs.none(f"the best baseline trial of {name!r} has another label set "
                                   f"({run.data.tags.get(contract.TAG_NUM_CLASSES)} classes, not {num_classes})")
    with open(mlf.download_artifacts(run_id, contract.PAIRS_ARTIFACT)) as fh:
        top = json.load(fh).get("top") or []
    if not top:
        return ReferencePairs.none(f"the best baseline trial of {name!r} confused no pair")
    sid = study.user_attrs.get(contract.STUDY_ID_ATTR, "")
    return ReferencePairs([list(map(int, p)) for p in top[: cfg.eval.top_n]],
                          f"study:{sid}/trial:{best.number}/run:{run_id}")


def resolve(cfg: RunConfig, storage, num_classes: int, log: Callable[[str], None] = print) -> ReferencePairs:
    """The reference pairs for runs of ``cfg``, with a failed look-up reported, not hidden."""
    try:
        ref = best_baseline_pairs(cfg, storage, num_classes)
    except Exception as exc:
        ref = ReferencePairs.none(f"reference-pair look-up failed ({type(exc).__name__}: {exc})")
    if ref.pairs is None:
        log(f"note: {contract.redact(ref.problem)}; each run is scored on its own first confusable pairs")
    return ref


def for_study(study, cfg: RunConfig, storage, num_classes: int, log: Callable[[str], None] = print) -> ReferencePairs:
    """A study's reference pairs: those recorded on it, else (non-baseline studies) the best
    baseline trial's, recorded now so that every later trial uses the same ones."""
    recorded = study.user_attrs.get(STUDY_ATTR)
    if recorded:
        return ReferencePairs(recorded["pairs"], recorded["source"])
    if cfg.variant.name == "baseline":  # its own trials define the pairs: each scores its own
        return ReferencePairs.none()
    ref = resolve(cfg, storage, num_classes, log)
    if ref.pairs is not None:
        study.set_user_attr(STUDY_ATTR, {"pairs": ref.pairs, "source": ref.source})
    return ref
