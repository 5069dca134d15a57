"""Runs and studies live in their stores, never in git: everything the harness writes under
mlruns/ and studies/ is ignored, and only the study configs are tracked."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRITTEN = ["mlruns/mlflow.db", "mlruns/artifacts/carrot/abc/artifacts/config.json", "studies/optuna.journal",
           "studies/optuna.journal.lock", "studies/.carrot-schema.lock", "studies/checkpoints/abc/trial-0/last.pt",
           "studies/logs/digits-test_resnet-baseline/worker-1.log", "studies/slurm/digits/0_0_log.out",
           "studies/x.db", "analysis/output/tables/main_results.md"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_the_harness_writes_is_ignored_and_the_configs_are_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert [p for p in WRITTEN if not ignored(p)] == []
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "studies").glob("*.yaml"))
    assert configs and [p for p in configs + ["studies/README.md"] if ignored(p)] == []
