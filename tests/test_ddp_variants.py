"""Every variant under torch.distributed equals one process on the concatenated batch.

Two CPU processes (gloo) each take one half of a global batch; one process (before the
process group exists) takes the whole batch. Every registered variant is run, plus the
settings whose DDP path differs (expansion's supcon mode and non-detached statistics,
nuisance's class basis, prototype's Mahalanobis metric, pairwise confusion's masked option);
prototype runs two steps, so the state carried from the first (confusion EMA, prototypes,
covariance) must agree too.

Scaling. One process minimises L = CE(global batch) + T(global batch), CE being a mean over
the W B samples. Rank r computes L_r on its B samples; DDP then averages the parameter
gradients over the W ranks, so what DDP optimises is mean_r L_r, and its gradient reaches
the backbone through the embeddings of every rank as (1 / W) sum_r (the embedding gradient
autograd leaves on rank r, including what the other ranks' backward sent to it through the
gathers). The variants are right when

    mean_r L_r == L                                         (to 1e-5), and
    grad of rank r's embeddings == W * (grad of L)[rows of rank r]    (W = 2),

e.g. for CE: rank r's mean over B samples has W times the per-sample weight of the mean
over W B samples. The same holds term by term, and is checked for the variant's own terms
(``loss - ce``) on their own, so a term that is small next to CE is still checked exactly.
The batch makes every term active and a sizeable part of the loss (asserted), and its P x K
labels put half of each class on each rank, so statistics taken from one rank's rows alone
differ from the global ones.

Nuisance draws Gaussian noise per sample: the draws are pinned to a table (row i of the
global batch gets row i of the table in both runs), so that its rows match.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest
import torch

D, K, CLASSES, PER_CLASS, WORLD = 12, 10, 8, 4, 2
B = CLASSES * PER_CLASS  # global batch; each rank holds B / WORLD
HEAD_SCALE = 3.0  # logit scale of the test head (see _head)

# (case name, variant, hyperparameters, training steps: the last one is compared)
# prototype's recommended setting makes its term small on the first steps of a tiny batch
# (omega and beta are EMA rates of 0.05): raised so the term and its gradient are large
PROTOTYPE = {"lam": 30.0, "alpha": 2.0, "conf_momentum": 1.0, "mu_momentum": 0.5, "warmup_epochs": 0.0}
CASES = [
    ("baseline", "baseline", {}, 1),
    ("prototype", "prototype", PROTOTYPE, 2),
    ("prototype+mahalanobis", "prototype", {**PROTOTYPE, "metric": "mahalanobis", "cov_refresh_every": 1}, 2),
    ("expansion", "expansion", {"lam": 10.0}, 1),
    ("expansion+supcon", "expansion", {"mode": "supcon"}, 1),
    ("expansion+stats_grad", "expansion", {"lam": 10.0, "detach_stats": False, "aux_ce_weight": 0.5}, 1),
    ("nuisance", "nuisance", {"warmup_epochs": 0.0}, 1),
    ("nuisance+class", "nuisance", {"warmup_epochs": 0.0, "basis": "class", "topk": 3}, 1),
    ("bhattacharyya", "bhattacharyya", {}, 1),
    ("bhattacharyya+fixed", "bhattacharyya", {"scale": "fixed", "lam": 3.0, "distance": "mean"}, 1),
    ("barrier", "barrier", {}, 1),
    ("pairwise_confusion", "pairwise_confusion", {}, 1),
    ("pairwise_confusion+different", "pairwise_confusion", {"pairs": "different"}, 1),
]


def _global_batches(steps: int):
    """``steps`` global batches (embeddings, labels), the class centres and fixed projections."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(K, D, generator=g)
    shared = torch.randn(D, generator=g)
    # P x K labels, each rank's half holding two samples of every class; the half-batch pairs
    # (i, i + B/2) of pairwise confusion: the first 8 share a label, the other 8 do not
    first = torch.arange(CLASSES).repeat(2)
    y = torch.cat([first, torch.arange(CLASSES), torch.arange(CLASSES).roll(-1)])
    batches = []
    for _ in range(steps):
        # close classes around a shared direction: prototypes at moderate distances, overlapping
        # Gaussians, classes that can be expanded, samples inside and beyond the nuisance margin
        emb = 1.5 * shared + 0.8 * centres[y] + 0.2 * torch.randn(B, D, generator=g)
        batches.append((emb, y))
    proj = [torch.randn(D, dl, generator=g) for dl in (5, 7)]
    noise = torch.randn(B, 1, D, generator=g, dtype=torch.float64)  # nuisance draws, one per sample
    return batches, centres, proj, noise


def _head(neck, centres: torch.Tensor, emb: torch.Tensor, scale: float):
    """A head that separates the classes on what it sees (the raw or the normalised embedding):
    weights along the class centres at ``scale`` times the inverse size of that input, and a bias
    that takes the shared direction (the batch mean) out of the logits."""
    from torch import nn

    with torch.no_grad():
        z = neck(emb)
        w = scale * centres / z.norm(dim=1).mean()
        head = nn.Linear(D, K)
        head.weight.copy_(w)
        head.bias.copy_(-(w @ z.mean(0)))
    return head


@contextlib.contextmanager
def _pinned_noise(table: torch.Tensor, offset: int):
    """torch.randn returns rows ``offset ..`` of ``table`` (nuisance's per-sample draws)."""
    real = torch.randn

    def fake(*size, generator=None, device=None, dtype=None, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        out = table[offset:offset + shape[0]]
        assert tuple(out.shape) == tuple(shape), f"unexpected draw {tuple(shape)}"
        return out.to(dtype or torch.get_default_dtype())

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = real


def _run_case(variant_name: str, hparams: dict, steps: int, rows: slice):
    """Train ``steps`` steps on ``rows`` of every global batch; the last step's loss, terms and
    embedding gradients (of the whole loss and of the variant's own terms)."""
    from carrot.variants import StepBatch, create_variant

    batches, centres, proj, noise = _global_batches(steps)
    variant = create_variant(variant_name, **hparams)
    neck = variant.build_neck(D)
    head = _head(neck, centres, batches[0][0], HEAD_SCALE)
    for step, (emb_all, y_all) in enumerate(batches):
        emb = emb_all[rows].clone().requires_grad_(True)
        z = neck(emb)
        features = {"stage2": torch.tanh(emb @ proj[0]), "stage3": emb @ proj[1], "stage4": emb * 1.5}
        batch = StepBatch(embedding=z, logits=head(z), labels=y_all[rows], head=head, features=features,
                          progress=10.0)
        with _pinned_noise(noise, rows.start):
            out = variant(batch)
        if step < steps - 1:
            continue
        own = [t for key, t in out.terms.items() if key != "ce"]
        own_total = torch.stack(own).sum() if own else None
        own_grad = (torch.autograd.grad(own_total, emb, retain_graph=True)[0] if own_total is not None
                    else torch.zeros_like(emb))
        (grad,) = torch.autograd.grad(out.loss, emb)
        return {
            "loss": out.loss.detach(), "terms": {k: t.detach() for k, t in out.terms.items()},
            "grad": grad, "own_grad": own_grad,
        }


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = {}
    half = B // WORLD
    if rank == 0:  # one process on the whole batch, before any process group exists
        results["single"] = {name: _run_case(v, hp, steps, slice(0, B)) for name, v, hp, steps in CASES}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results["ddp"] = {name: _run_case(v, hp, steps, slice(rank * half, (rank + 1) * half))
                          for name, v, hp, steps in CASES}
        dist.barrier()  # no rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return ranks[0]["single"], [r["ddp"] for r in ranks]


def test_every_registered_variant_has_a_case():
    from carrot.variants import get_variant_class, list_variants

    built_in = {n for n in list_variants() if get_variant_class(n).__module__.startswith("carrot.variants.")}
    assert built_in <= {variant for _, variant, _, _ in CASES}, "a variant without a DDP case"


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_ddp_matches_one_process_on_the_concatenated_batch(ddp_results, case):
    single_all, ranks = ddp_results
    single = single_all[case]
    half = B // WORLD

    # the terms are active and sizeable, so a wrong gather or scaling cannot hide in round-off
    own_terms = {k: v for k, v in single["terms"].items() if k != "ce"}
    if case != "baseline":
        own = sum(v.abs().item() for v in own_terms.values())
        assert own > 0.05 * single["loss"].abs().item(), f"{case}: its term is too small to test ({own_terms})"
        assert single["own_grad"].norm() > 0.05 * single["grad"].norm(), f"{case}: its term barely moves the embeddings"

    mean_loss = sum(r[case]["loss"] for r in ranks) / WORLD
    assert mean_loss.item() == pytest.approx(single["loss"].item(), rel=1e-5, abs=1e-5)
    for key, value in single["terms"].items():
        mean_term = sum(r[case]["terms"][key] for r in ranks) / WORLD
        assert mean_term.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-5), f"{case}: term {key}"
    for which in ("grad", "own_grad"):
        want_all = WORLD * single[which]  # DDP divides by W what the ranks' embeddings receive
        scale = want_all.abs().max().item()
        for r, res in enumerate(ranks):
            want = want_all[r * half:(r + 1) * half]
            torch.testing.assert_close(res[case][which], want, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{case}, rank {r}, {which}: {m}")


if __name__ == "__main__":  # a quick look at the sizes of the terms in the test batch
    for name, v, hp, steps in CASES:
        res = _run_case(v, hp, steps, slice(0, B))
        print(name, {k: round(t.item(), 4) for k, t in res["terms"].items()},
              "own/total grad", round((res["own_grad"].norm() / res["grad"].norm()).item(), 3), file=sys.stderr)
