"""Reference pairs: the confusable pairs every variant of a dataset is scored on.

The caller (a study, ``carrot final``, ``carrot train``) resolves them once and hands them
to each run, which records their source; the evaluation never searches the store itself.
Today's definition: the top-N pairs of the newest finished baseline study trial on the same
dataset, backbone and label set. Without one, each run takes its own pairs of its first
evaluation (``self:epoch1``). A look-up that fails is reported and tagged, not hidden.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from carrot import contract
from carrot.config import RunConfig


@dataclass(frozen=True)
class ReferencePairs:
    pairs: list[list[int]] | None  # None: the run uses its own first pairs
    source: str = ""  # "run:<id>" where the pairs came from
    problem: str = ""  # why no pairs were found, when the look-up itself failed

    @classmethod
    def none(cls) -> "ReferencePairs":
        return cls(None)


def count_classes(cfg: RunConfig) -> int:
    """The number of classes of ``cfg``'s dataset (builds its index, decodes no image)."""
    from carrot.data import ImageSpec, build_dataset

    return build_dataset(cfg.data, ImageSpec(input_size=cfg.data.image_size or 224)).num_classes


def find_reference_pairs(cfg: RunConfig, num_classes: int, log: Callable[[str], None] = print) -> ReferencePairs:
    """Top-N pairs of the newest finished baseline study trial (validation split) on the same
    dataset (and label level), backbone and number of classes. Test-split runs never supply
    reference pairs, so the pairs are never chosen on test data."""
    from carrot.tracking import client, find_runs

    query = (f"tags.`{contract.TAG_VARIANT}` = 'baseline' and tags.`{contract.TAG_DATASET}` = "
             f"'{cfg.data.dataset_id}' and tags.`{contract.TAG_BACKBONE}` = '{cfg.model.backbone}' and "
             f"tags.`{contract.TAG_SPLIT}` = 'val' and tags.`{contract.TAG_NUM_CLASSES}` = '{num_classes}' "
             "and attributes.status = 'FINISHED'")
    try:
        mlf = client()
        runs = find_runs(mlf, cfg.experiment, query, order_by=["attributes.end_time DESC"])
        for r in runs:
            try:
                path = mlf.download_artifacts(r.info.run_id, contract.PAIRS_ARTIFACT)
            except Exception:  # a run without the artifact (killed while writing it) is skipped
                continue
            with open(path) as fh:
                top = json.load(fh).get("top")
            if top and all(0 <= i < num_classes and 0 <= j < num_classes for i, j in top):
                return ReferencePairs([list(p) for p in top[: cfg.eval.top_n]], f"run:{r.info.run_id}")
    except Exception as exc:  # the runs still train; the problem is logged and tagged on each
        problem = f"reference-pair look-up failed ({type(exc).__name__}: {exc})"
        log(f"warning: {problem}; each run uses its own first pairs")
        return ReferencePairs(None, problem=problem)
    return ReferencePairs.none()
