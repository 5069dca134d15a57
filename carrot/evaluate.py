"""Per-epoch evaluation over a whole split: every diagnostic of SPEC.md in one pass.

One forward pass over the evaluation split gives embeddings, logits and the pooled
features of the probed layers; :mod:`carrot.diagnostics` turns them into the logged
numbers. Reference pairs (the baseline's top-N pairs on the same dataset and backbone)
are fixed at the start of the run so every variant is scored on the same pairs.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from carrot import diagnostics as dg
from carrot.config import RunConfig
from carrot.data import DatasetSplits
from carrot.model import CarrotModel

PAIRS_ARTIFACT = "pairs.json"
CONFUSION_ARTIFACT = "confusion.npz"
DIAGNOSTICS_ARTIFACT = "diagnostics.json"


@dataclass
class Collected:
    embeddings: Tensor  # (N, D) float32
    logits: Tensor  # (N, K) float32
    labels: Tensor  # (N,) int64
    features: dict[str, Tensor] = field(default_factory=dict)  # layer -> (N, D_l) float32


@torch.no_grad()
def collect(model: CarrotModel, loader, device: torch.device, amp: bool = False,
            with_features: bool = True) -> Collected:
    """Run ``loader`` through ``model`` in eval mode and keep everything on ``device``."""
    was_training = model.training
    model.eval()
    emb, logits, labels = [], [], []
    feats: dict[str, list[Tensor]] = {}
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = model(x, with_features=with_features)
        emb.append(out.embedding.float())
        logits.append(out.logits.float())
        labels.append(y.to(device))
        for name, value in out.features.items():
            feats.setdefault(name, []).append(value.float())
    model.train(was_training)
    return Collected(torch.cat(emb), torch.cat(logits), torch.cat(labels),
                     {k: torch.cat(v) for k, v in feats.items()})


def find_reference_pairs(cfg: RunConfig, num_classes: int, top_n: int) -> tuple[list[list[int]] | None, str]:
    """Top-N pairs of the newest finished baseline *study trial* (validation split) on the same
    dataset (and label level), backbone and number of classes. Test-split runs never supply
    reference pairs, so the pairs are never chosen on test data."""
    from carrot.tracking import client, find_runs

    try:
        mlf = client()
        runs = find_runs(
            mlf, cfg.experiment,
            "tags.`carrot.variant` = 'baseline' and tags.`carrot.dataset` = '{}' and tags.`carrot.backbone` = '{}'"
            " and tags.`carrot.split` = 'val' and tags.`carrot.num_classes` = '{}'"
            " and attributes.status = 'FINISHED'".format(cfg.data.dataset_id, cfg.model.backbone, num_classes),
            order_by=["attributes.end_time DESC"],
        )
    except Exception:  # an unreachable store is reported by the run itself, not here
        return None, ""
    for r in runs:
        try:
            path = mlf.download_artifacts(r.info.run_id, PAIRS_ARTIFACT)
        except Exception:
            continue
        with open(path) as fh:
            top = json.load(fh).get("top")
        if top and all(0 <= i < num_classes and 0 <= j < num_classes for i, j in top):
            return [list(p) for p in top[:top_n]], r.info.run_id
    return None, ""


class Evaluator:
    """Computes and remembers the per-epoch diagnostics of one run."""

    def __init__(self, cfg: RunConfig, splits: DatasetSplits, split: str, model: CarrotModel,
                 device: torch.device, logger=None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.split, self.model, self.device, self.logger = cfg, split, model, device, logger
        self.num_classes = splits.num_classes
        self.class_names = splits.class_names
        self.confusions: list[np.ndarray] = []
        self.records: list[dict] = []
        self.top_pairs: Tensor | None = None
        self.ref_pairs: Tensor | None = None
        self.ref_source = ""
        if logger is not None:
            pairs, source = find_reference_pairs(cfg, self.num_classes, cfg.eval.top_n)
            if pairs:
                self.ref_pairs = torch.tensor(pairs, dtype=torch.long)
                self.ref_source = f"run:{source}"

    def evaluate(self, epoch: int, loader, probe_loader, amp: bool) -> dict[str, float]:
        start = time.time()
        K = self.num_classes
        got = collect(self.model, loader, self.device, amp)
        s = self.split
        pred = got.logits.argmax(dim=1)
        cm = dg.confusion_matrix(pred, got.labels, K)
        metrics: dict[str, float] = {
            f"{s}/acc": float(dg.accuracy(cm)),
            f"{s}/mean_class_acc": float(dg.mean_class_accuracy(cm)),
            f"{s}/loss": float(F.cross_entropy(got.logits, got.labels)),
        }
        top = dg.confusable_pairs(cm, self.cfg.eval.top_n, include_zero=True).cpu()
        if self.ref_pairs is None:  # no baseline run yet: the run's own first pairs, marked as such
            self.ref_pairs = top.clone()
            self.ref_source = f"self:epoch{epoch + 1}"
            if self.logger:
                self.logger.set_tags({"carrot.ref_pairs_source": self.ref_source})
        elif epoch == 0 and self.logger:
            self.logger.set_tags({"carrot.ref_pairs_source": self.ref_source})
        self.top_pairs = top
        ref = self.ref_pairs
        record: dict = {"epoch": epoch + 1, "top_pairs": top.tolist(), "ref_pairs": ref.tolist()}

        top_err = dg.pair_error(cm, top.to(cm.device))
        ref_err = dg.pair_error(cm, ref.to(cm.device))
        metrics["pairs/top_error"] = float(top_err.mean())
        metrics["pairs/ref_error"] = float(ref_err.mean())
        record["top_error"], record["ref_error"] = top_err.tolist(), ref_err.tolist()

        protos = dg.class_prototypes(got.embeddings, got.labels, K)
        top_cos = dg.prototype_cosine(protos, top.to(protos.device))
        ref_cos = dg.prototype_cosine(protos, ref.to(protos.device))
        off_mean, off_std = dg.offdiag_cosine_stats(protos)
        metrics.update({
            "proto_cos/top_mean": _nanmean(top_cos), "proto_cos/ref_mean": _nanmean(ref_cos),
            "proto_cos/offdiag_mean": float(off_mean), "proto_cos/offdiag_std": float(off_std),
        })
        for (i, j), value in zip(ref.tolist(), ref_cos.tolist()):
            metrics[f"proto_cos/ref/{i}-{j}"] = value
        record["top_cos"], record["ref_cos"] = top_cos.tolist(), ref_cos.tolist()

        for layer, feats in got.features.items():
            dist, rho = dg.pair_bhattacharyya(feats, got.labels, K, torch.cat([top, ref]).to(feats.device))
            top_rho, ref_rho = rho[: len(top)], rho[len(top):]
            metrics[f"rho/{layer}/top_mean"] = _nanmean(top_rho)
            metrics[f"rho/{layer}/ref_mean"] = _nanmean(ref_rho)
            # rho underflows to 0 on wide layers; the distance D_B = -log rho does not
            metrics[f"bhattacharyya/{layer}/top_distance"] = _nanmean(dist[: len(top)])
            metrics[f"bhattacharyya/{layer}/ref_distance"] = _nanmean(dist[len(top):])
            record[f"rho/{layer}/top"], record[f"rho/{layer}/ref"] = top_rho.tolist(), ref_rho.tolist()

        metrics["nc/nc1"] = float(dg.nc1(got.embeddings, got.labels, K))
        metrics["time/eval_s"] = time.time() - start

        if probe_loader is not None:
            probe_start = time.time()
            train = collect(self.model, probe_loader, self.device, amp)
            keep = _stratified_subset(train.labels.cpu().numpy(), self.cfg.eval.probe_max_train, self.cfg.seed)
            keep_t = torch.as_tensor(keep, device=train.labels.device)
            layers = dict(got.features)
            layers["embedding"] = got.embeddings
            train_layers = dict(train.features)
            train_layers["embedding"] = train.embeddings
            for layer, feats in layers.items():
                res = dg.linear_probe(train_layers[layer][keep_t], train.labels[keep_t], feats, got.labels, K,
                                      l2_grid=tuple(self.cfg.eval.probe_l2_grid), seed=self.cfg.seed,
                                      device=self.device)
                metrics[f"probe/{layer}/acc"] = float(res["acc"])
                record[f"probe/{layer}/l2"] = float(res["l2"])
            metrics["time/probe_s"] = time.time() - probe_start

        self.confusions.append(cm.cpu().numpy().astype(np.int64))
        self.records.append(record)
        return metrics

    def save_artifacts(self) -> None:
        """Confusion matrices of every epoch (one compressed file), pair sets, per-pair values."""
        if self.logger is None or not self.confusions:
            return
        buf = io.BytesIO()
        np.savez_compressed(buf, confusion=np.stack(self.confusions),
                            epochs=np.arange(1, len(self.confusions) + 1), class_names=np.array(self.class_names))
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, CONFUSION_ARTIFACT)
            path.write_bytes(buf.getvalue())
            self.logger.log_artifact(path)
        self.logger.log_dict({
            "top": self.top_pairs.tolist() if self.top_pairs is not None else [],
            "reference": self.ref_pairs.tolist() if self.ref_pairs is not None else [],
            "reference_source": self.ref_source,
            "top_n": self.cfg.eval.top_n,
            "class_names": self.class_names,
        }, PAIRS_ARTIFACT)
        self.logger.log_dict(self.records, DIAGNOSTICS_ARTIFACT)


def _nanmean(x: Tensor) -> float:
    x = x.float()
    ok = torch.isfinite(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


def _stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` indices, the same fraction of every class."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    frac = limit / len(labels)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, int(round(frac * len(idx)))), replace=False))
    return np.sort(np.concatenate(keep))
