"""The routes a CUDA step takes, run on the CPU (carrot.geometry.device_routes): no operation in
them syncs with the host (carrot.syncs), and they give the host routes' numbers."""
from __future__ import annotations

import pytest
import torch

from carrot.bench import EmbeddingBench
from carrot.geometry import device_routes, reads_on_host
from carrot.syncs import sync_ops
from carrot.variants import get_variant_class, list_variants

CPU = torch.device("cpu")
X = torch.randn(6, 3)
MASK = X[:, 0] > 0
Y = torch.tensor([0, 1, 1, 2, 2, 2])
SPD = X.T @ X + torch.eye(3)
ROWS, REPEATS = torch.tensor([0, 2]), torch.tensor([1, 1, 1, 1, 1, 2])  # made outside the checked calls


@pytest.mark.parametrize("name, fn", [
    ("item", lambda: X.sum().item()), ("int", lambda: int(Y.max())), ("if", lambda: bool((X > 0).any())),
    ("nonzero", lambda: torch.nonzero(MASK)), ("unique", lambda: torch.unique(Y, return_counts=True)),
    ("mask index", lambda: X[MASK]), ("mask assign", lambda: X.clone().__setitem__(MASK, 0.0)),
    ("masked_select", lambda: torch.masked_select(X, MASK[:, None])),
    ("repeat_interleave", lambda: X.repeat_interleave(REPEATS, dim=0)),
    ("bincount", lambda: torch.bincount(Y)), ("eigh", lambda: torch.linalg.eigh(SPD)),
    ("cholesky", lambda: torch.linalg.cholesky(SPD)), ("inv", lambda: torch.linalg.inv(SPD)),
    ("equal", lambda: torch.equal(X, X)), ("allclose", lambda: torch.allclose(X, X)),
    ("svd", lambda: torch.linalg.svd(SPD)), ("tensor from Python data", lambda: X / torch.tensor([1.0, 2.0, 3.0])),
])
def test_the_detector_finds_each_kind_of_sync(name, fn):
    assert sync_ops(fn), name


@pytest.mark.parametrize("name, fn", [
    ("cholesky_ex", lambda: torch.linalg.cholesky_ex(SPD)), ("topk", lambda: torch.topk(X[:, 0], 2)),
    ("sort", lambda: torch.sort(Y)), ("integer index", lambda: X[ROWS]),
    ("where", lambda: torch.where(MASK[:, None], X, 0.0)), ("repeat by an int", lambda: X.repeat_interleave(2, 0)),
    ("repeat with its size", lambda: X.repeat_interleave(REPEATS, dim=0, output_size=7)),
    ("triangular solve", lambda: torch.linalg.solve_triangular(torch.eye(3), X.T, upper=False)),
    ("backward", lambda: (X.clone().requires_grad_() ** 2).sum().backward()),
])
def test_the_detector_passes_what_does_not_sync(name, fn):
    assert sync_ops(fn) == [], name


def _specs() -> list[str]:
    """Every variant at its defaults, and once with each value of each of its categorical knobs."""
    specs = []
    for name in list_variants():
        specs.append(name)
        for key, dist in get_variant_class(name).search_space.items():
            for value in getattr(dist, "choices", ()):
                specs.append(f"{name}:{key}={str(value).lower() if isinstance(value, bool) else value}")
    return sorted(set(specs))


def _bench(spec: str) -> EmbeddingBench:
    return EmbeddingBench(CPU, batch=24, classes_in_batch=6, num_classes=20, dim=32, variants=[spec], seed=3)


@pytest.mark.parametrize("spec", _specs())
def test_the_cuda_route_of_every_variant_step_has_no_host_sync(spec):
    bench = _bench(spec)
    with device_routes():
        bench.steps[0]()  # first-call paths (lazily made state) outside the check, as on CUDA
        assert sync_ops(bench.steps[0]) == []


def test_the_host_routes_read_on_the_host_and_device_routes_turns_them_off():
    """The check sees the host's reads where a CPU step takes them (the classes present,
    counted on the host), so an empty list above is the device route's, not a blind check."""
    bench = _bench("prototype")
    bench.steps[0]()
    assert reads_on_host(CPU) and sync_ops(bench.steps[0])
    with device_routes():
        assert not reads_on_host(CPU)
    assert reads_on_host(CPU)


@pytest.mark.parametrize("spec", _specs())
def test_the_cuda_route_gives_the_host_routes_numbers(spec):
    """Two benches in the same state, one step each: the gradients of every trained tensor and
    the variant's state after the step agree between the routes."""
    host, device = _bench(spec), _bench(spec)
    torch.manual_seed(0)
    host.steps[0]()
    torch.manual_seed(0)
    with device_routes():
        device.steps[0]()
    for a, b in zip(host.trained[0], device.trained[0]):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    host_state, device_state = host.variants[0].state_dict(), device.variants[0].state_dict()
    assert list(host_state) == list(device_state)
    for key, value in host_state.items():
        torch.testing.assert_close(device_state[key], value, rtol=1e-5, atol=1e-7, msg=key)
