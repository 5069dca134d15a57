"""Per-epoch evaluation over a whole split: every diagnostic of SPEC.md in one pass.

One forward pass over the evaluation split gives embeddings, logits and the pooled
features of the probed layers; :mod:`carrot.diagnostics` turns them into the logged
numbers. Reference pairs (the baseline's top-N pairs on the same dataset and backbone)
are fixed at the start of the run so every variant is scored on the same pairs.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from carrot import contract, interrupt
from carrot import diagnostics as dg
from carrot.config import RunConfig
from carrot.data import DatasetSplits, stratified_split
from carrot.model import CarrotModel
from carrot.reference import ReferencePairs



@dataclass
class Collected:
    embeddings: Tensor  # (N, D) float32
    logits: Tensor  # (N, K) float32
    labels: Tensor  # (N,) int64
    features: dict[str, Tensor] = field(default_factory=dict)  # layer -> (N, D_l) float32


@torch.no_grad()
def collect(model: CarrotModel, loader, device: torch.device, amp: torch.dtype | None = None,
            with_features: bool = True) -> Collected:
    """Run ``loader`` through ``model`` in eval mode and keep everything on ``device``."""
    was_training = model.training
    model.eval()
    emb, logits, labels = [], [], []
    feats: dict[str, list[Tensor]] = {}
    for x, y in loader:
        interrupt.check()
        x = x.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
            out = model(x, with_features=with_features)
        emb.append(out.embedding.float())
        logits.append(out.logits.float())
        labels.append(y.to(device))
        for name, value in out.features.items():
            feats.setdefault(name, []).append(value.float())
    model.train(was_training)
    return Collected(torch.cat(emb), torch.cat(logits), torch.cat(labels),
                     {k: torch.cat(v) for k, v in feats.items()})


class Evaluator:
    """Computes and remembers the per-epoch diagnostics of one run."""

    def __init__(self, cfg: RunConfig, splits: DatasetSplits, split: str, model: CarrotModel,
                 device: torch.device, reference: ReferencePairs | None = None) -> None:
        self.cfg, self.split, self.model, self.device = cfg, split, model, device
        self.num_classes = splits.num_classes
        self.class_names = splits.class_names
        self.confusions: list[np.ndarray] = []
        self.records: list[dict] = []
        self.top_pairs: Tensor | None = None
        reference = reference or ReferencePairs.none()
        self.ref_pairs: Tensor | None = (torch.tensor(reference.pairs, dtype=torch.long)
                                         if reference.pairs else None)
        self.ref_source = reference.source if reference.pairs else ""
        self.ref_problem = reference.problem
        self.predictions: dict[str, np.ndarray] | None = None

    def evaluate(self, epoch: int, loader, probe_loader, amp: torch.dtype | None = None) -> dict[str, float]:
        start = time.time()
        K = self.num_classes
        got = collect(self.model, loader, self.device, amp)
        s = self.split
        pred = got.logits.argmax(dim=1)
        cm = dg.confusion_matrix(pred, got.labels, K)
        metrics: dict[str, float] = {
            contract.split_metric(s, "acc"): float(dg.accuracy(cm)),
            contract.split_metric(s, "mean_class_acc"): float(dg.mean_class_accuracy(cm)),
            contract.split_metric(s, "loss"): float(F.cross_entropy(got.logits, got.labels)),
        }
        # only pairs that were confused (S > 0): below them the order would be arbitrary
        top = dg.confusable_pairs(cm, self.cfg.eval.top_n).cpu()  # (P, 2), P <= top_n
        if self.ref_pairs is None and len(top):  # no reference given: the run's own first real pairs
            self.ref_pairs = top.clone()
            self.ref_source = f"self:epoch{epoch + 1}"
        self.top_pairs = top
        ref = self.ref_pairs if self.ref_pairs is not None else top  # (R, 2)
        record: dict = {"epoch": epoch + 1, "top_pairs": top.tolist(), "ref_pairs": ref.tolist()}
        metrics[contract.N_TOP] = float(len(top))
        metrics[contract.N_REF] = float(len(ref))

        top_err = dg.pair_error(cm, top.to(cm.device))
        ref_err = dg.pair_error(cm, ref.to(cm.device))
        metrics[contract.TOP_ERROR] = _nanmean(top_err)
        metrics[contract.REF_ERROR] = _nanmean(ref_err)
        record["top_error"], record["ref_error"] = top_err.tolist(), ref_err.tolist()

        protos = dg.class_prototypes(got.embeddings, got.labels, K)
        top_cos = dg.prototype_cosine(protos, top.to(protos.device))
        ref_cos = dg.prototype_cosine(protos, ref.to(protos.device))
        off_mean, off_std = dg.offdiag_cosine_stats(protos)
        metrics.update({
            contract.PROTO_COS_TOP: _nanmean(top_cos), contract.PROTO_COS_REF: _nanmean(ref_cos),
            contract.PROTO_COS_OFFDIAG_MEAN: float(off_mean), contract.PROTO_COS_OFFDIAG_STD: float(off_std),
        })
        for (i, j), value in zip(ref.tolist(), ref_cos.tolist()):
            metrics[contract.proto_cos_pair(i, j)] = value
        record["top_cos"], record["ref_cos"] = top_cos.tolist(), ref_cos.tolist()

        for layer, feats in got.features.items():
            dist, rho = dg.pair_bhattacharyya(feats, got.labels, K, torch.cat([top, ref]).to(feats.device))
            top_rho, ref_rho = rho[: len(top)], rho[len(top):]
            metrics[contract.rho_metric(layer, "top")] = _nanmean(top_rho)
            metrics[contract.rho_metric(layer, "ref")] = _nanmean(ref_rho)
            # rho underflows to 0 on wide layers; the distance D_B = -log rho does not
            metrics[contract.db_metric(layer, "top")] = _nanmean(dist[: len(top)])
            metrics[contract.db_metric(layer, "ref")] = _nanmean(dist[len(top):])
            record[f"rho/{layer}/top"], record[f"rho/{layer}/ref"] = top_rho.tolist(), ref_rho.tolist()

        metrics[contract.NC1] = float(dg.nc1(got.embeddings, got.labels, K))
        metrics["time/eval_s"] = time.time() - start

        if probe_loader is not None:
            probe_start = time.time()
            train = collect(self.model, probe_loader, self.device, amp)
            keep = probe_subset(train.labels.cpu().numpy(), self.cfg.eval.probe_max_train, self.cfg.seed)
            keep_t = torch.as_tensor(keep, device=train.labels.device)
            layers = dict(got.features)
            layers["embedding"] = got.embeddings
            train_layers = dict(train.features)
            train_layers["embedding"] = train.embeddings
            for layer, feats in layers.items():
                res = dg.linear_probe(train_layers[layer][keep_t], train.labels[keep_t], feats, got.labels, K,
                                      l2_grid=tuple(self.cfg.eval.probe_l2_grid), seed=self.cfg.seed,
                                      device=self.device)
                metrics[contract.probe_metric(layer)] = float(res["acc"])
                record[f"probe/{layer}/l2"] = float(res["l2"])
            metrics["time/probe_s"] = time.time() - probe_start

        self.confusions.append(cm.cpu().numpy().astype(np.int64))
        self.records.append(record)
        if self.split == "test":  # final runs: per-sample predictions of the latest epoch
            probs = torch.softmax(got.logits, dim=1)
            top5 = probs.topk(min(5, K), dim=1)
            self.predictions = {"index": np.arange(len(got.labels)), "label": got.labels.cpu().numpy(),
                                "pred": pred.cpu().numpy(), "top5_class": top5.indices.cpu().numpy(),
                                "top5_prob": top5.values.cpu().numpy().astype(np.float32)}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the evaluation so far."""
        return {"confusions": self.confusions, "records": self.records, "top_pairs": self.top_pairs,
                "ref_pairs": self.ref_pairs, "ref_source": self.ref_source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.confusions, self.records = list(state["confusions"]), list(state["records"])
        self.top_pairs, self.ref_pairs, self.ref_source = state["top_pairs"], state["ref_pairs"], state["ref_source"]

    def artifacts(self) -> dict[str, Any]:
        """Artifact name -> content: the confusion matrices of every epoch (npz bytes), the
        pair sets and their source, the per-pair values of every epoch."""
        if not self.confusions:
            return {}
        buf = io.BytesIO()
        np.savez_compressed(buf, confusion=np.stack(self.confusions),
                            epochs=np.arange(1, len(self.confusions) + 1), class_names=np.array(self.class_names))
        pairs = {
            "top": self.top_pairs.tolist() if self.top_pairs is not None else [],
            "reference": self.ref_pairs.tolist() if self.ref_pairs is not None else [],
            "reference_source": self.ref_source,
            "top_n": self.cfg.eval.top_n,
            "class_names": self.class_names,
        }
        if self.ref_problem:
            pairs["reference_problem"] = self.ref_problem
        out: dict[str, Any] = {contract.CONFUSION_ARTIFACT: buf.getvalue(), contract.PAIRS_ARTIFACT: pairs,
                               contract.DIAGNOSTICS_ARTIFACT: self.records}
        if self.predictions is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **self.predictions)
            out[contract.PREDICTIONS_ARTIFACT] = buf.getvalue()
        return out


def _nanmean(x: Tensor) -> float:
    """The mean of the finite entries in float64 (NaN when none is): a pair metric's per-pair
    values are float64 or float32, and their mean is logged as a float64 number."""
    x = x.double()
    ok = torch.isfinite(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


def probe_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most about ``limit`` indices, the same fraction of every class (the stratified split)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, 1.0 - limit / len(labels), seed)
    return keep
