"""Fixed-seed CPU runs of every variant log the metrics recorded in ``fixtures/golden_metrics.json``.

A refactor that moves a number (a different split, a changed reduction, a lost gradient) fails
here, key by key. A deliberate change of a definition re-records the fixture in its own commit
(``python tests/test_golden.py --record``) and says why.

The runs train in float64 (the model, and every tensor made without a dtype). In float32 the
CPU's instruction set alone (AVX2, AVX-512 or plain kernels) moves the loss by 1e-4 after one
epoch and the validation accuracy by 10% after two, so a fixture recorded on one kind of machine
failed on every other. In float64, between ATen's AVX2 and plain kernels, six of the cases agree
to 1e-5 (what is still float32, some diagnostics); in the other seven a linear probe flips one
validation sample in 216, or D_B moves by 0.4%, or a KL near 0 by 3e-9. The fixture is recorded
on the machines the suite runs on (x86-64, AVX2).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "golden_metrics.json"
CASES = json.loads(FIXTURE.read_text())


REL, ABS = 1e-4, 1e-8  # far below any change of a definition (see above)


def golden_run(variant: str, hparams: dict, data: dict) -> list[dict[str, float]]:
    import torch

    from carrot.config import RunConfig
    from carrot.train import run

    cfg = RunConfig.from_dict({"variant": {"name": variant, "hparams": dict(hparams)}, "optim": {"epochs": 2},
                               "device": "cpu", "show_progress": False, "data": {"limit_per_class": 40, **data},
                               "eval": {"probe": "last"}})  # the probes after the last epoch, as recorded
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = run(cfg, track=False, log=lambda s: None)
    finally:
        torch.set_default_dtype(default)
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in result.history]


@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_match_the_recorded_run(case):
    expected = CASES[case]["history"]
    got = golden_run(CASES[case]["variant"], CASES[case]["hparams"], CASES[case]["data"])
    assert len(got) == len(expected)
    for epoch, (g, e) in enumerate(zip(got, expected), start=1):
        assert sorted(g) == sorted(e), f"epoch {epoch}: keys differ: {sorted(set(g) ^ set(e))}"
        for key in e:
            if math.isnan(e[key]):
                assert math.isnan(g[key]), f"epoch {epoch} {key}: {g[key]} (recorded NaN)"
            else:
                assert g[key] == pytest.approx(e[key], rel=REL, abs=ABS), f"epoch {epoch} {key}"


if __name__ == "__main__" and "--record" in sys.argv:
    # python tests/test_golden.py --record [CASE ...]: re-record the named cases (default: all)
    names = sys.argv[sys.argv.index("--record") + 1:] or sorted(CASES)
    for case in names:
        spec = CASES[case]
        CASES[case] = {**spec, "history": golden_run(spec["variant"], spec["hparams"], spec["data"])}
    FIXTURE.write_text(json.dumps(CASES, indent=1, sort_keys=True) + "\n")
