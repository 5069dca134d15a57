"""Adding a variant is one new file: a toy variant, registered from a file outside the package,
runs a one-epoch study through the same study code as the built-in ones."""
from __future__ import annotations

import importlib.util
import textwrap

import optuna
import pytest

pytestmark = pytest.mark.slow

TOY = textwrap.dedent('''
    """``toy_center``: CE + lam * mean squared distance of the embeddings to their batch mean."""
    from dataclasses import dataclass

    from optuna.distributions import FloatDistribution
    from torch import Tensor

    from carrot.variants import register_variant
    from carrot.variants.base import BaseHparams, StepBatch, Variant


    @dataclass
    class ToyHparams(BaseHparams):
        lam: float = 0.1


    @register_variant
    class ToyCenter(Variant):
        name = "toy_center"
        Hparams = ToyHparams
        search_space = {"lam": FloatDistribution(0.01, 1.0, log=True)}
        statistics = ("spread",)

        def compute(self, batch: StepBatch, ce: Tensor):
            z = batch.embedding.float()
            spread = ((z - z.mean(0)) ** 2).sum(1).mean()
            return {"toy": self.hp.lam * spread}, {"spread": spread}
''')


def test_a_variant_from_one_file_runs_a_study(store, tmp_path, mlflow_client):
    path = tmp_path / "toy_center.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_center", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # @register_variant is all the registration there is

    from carrot.study import open_storage, run_study
    from carrot.variants import _REGISTRY, list_variants
    from conftest import tiny_config

    try:
        assert "toy_center" in list_variants()
        cfg = tiny_config(**{"variant.name": "toy_center", "optim.epochs": 1})
        summary = run_study(cfg, trials=2, log=lambda s: None)
        assert summary.n_complete == 2
        study = optuna.load_study(study_name=summary.name, storage=open_storage(None))
        assert study.trials[0].params["lam"] == pytest.approx(0.1)  # trial 0: the recommended setting
        assert {"lam", "optim.lr"} <= set(study.trials[1].params)
        run = mlflow_client.get_run(summary.best_run_id)
        assert run.data.tags["carrot.variant"] == "toy_center"
        assert "train/toy" in run.data.metrics and "var/spread" in run.data.metrics
        assert run.data.metrics["var/spread"] > 0
    finally:
        _REGISTRY.pop("toy_center", None)
