"""Fixed-seed CPU runs of every variant log the metrics recorded in ``fixtures/golden_metrics.json``.

The fixture was written by the same runs before the training loop was split into steps; a
refactor that moves a number (a different split, a changed reduction, a lost gradient) fails
here, key by key. A deliberate change of a definition re-records the fixture in its own commit
(``python tests/test_golden.py --record``) and says why.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "golden_metrics.json"
CASES = json.loads(FIXTURE.read_text())


def golden_run(variant: str, hparams: dict, data: dict) -> list[dict[str, float]]:
    from carrot.config import RunConfig
    from carrot.train import run

    cfg = RunConfig.from_dict({"variant": {"name": variant, "hparams": dict(hparams)}, "optim": {"epochs": 2},
                               "device": "cpu", "show_progress": False, "data": {"limit_per_class": 40, **data},
                               "eval": {"probe": "last"}})  # the probes after the last epoch, as recorded
    result = run(cfg, track=False, log=lambda s: None)
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
                assert g[key] == pytest.approx(e[key], rel=1e-9, abs=1e-12), f"epoch {epoch} {key}"


if __name__ == "__main__" and "--record" in sys.argv:
    # python tests/test_golden.py --record [CASE ...]: re-record the named cases (default: all)
    names = sys.argv[sys.argv.index("--record") + 1:] or sorted(CASES)
    for case in names:
        spec = CASES[case]
        CASES[case] = {**spec, "history": golden_run(spec["variant"], spec["hparams"], spec["data"])}
    FIXTURE.write_text(json.dumps(CASES, indent=1, sort_keys=True) + "\n")
