"""One epoch of training on a fixture in every official layout; study configs parse."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import fixtures_fgvc as fx
from carrot.cli import main
from carrot.config import RunConfig
from carrot.train import run

REPO = Path(__file__).resolve().parents[1]

MAKERS = {
    "cub": fx.make_cub, "nabirds": fx.make_nabirds, "aircraft": fx.make_aircraft, "cars": fx.make_cars,
    "flowers": fx.make_flowers, "imagefolder": lambda tmp: fx.make_imagefolder(tmp, with_val=False),
}


def _cfg(name: str, root: Path, **extra) -> RunConfig:
    data = {"data": {"name": name, "root": str(root), "image_size": 32, "batch_size": 4, "val_fraction": 0.25},
            "optim": {"epochs": 1}, "eval": {"probe_l2_grid": [1e-2], "probe": "last"}, "device": "cpu", "show_progress": False}
    for key, value in extra.items():
        section, _, field = key.partition(".")
        data.setdefault(section, {})[field] = value
    return RunConfig.from_dict(data)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_one_epoch_on_each_layout(tmp_path, name):
    fixture = MAKERS[name](tmp_path)
    result = run(_cfg(name, fixture.root), track=False, log=lambda s: None)
    assert result.epochs_done == 1
    assert 0.0 <= result.metrics["val/acc"] <= 1.0
    assert any(k.startswith("probe/") for k in result.metrics)


def test_one_epoch_pk_sampler_on_real_layout(tmp_path):
    fixture = fx.make_cub(tmp_path)
    cfg = _cfg("cub", fixture.root, **{"variant.name": "barrier"})
    cfg.data.m_per_class = 2
    result = run(cfg, track=False, log=lambda s: None)
    assert result.metrics["var/classes_used"] >= 1


@pytest.mark.slow
def test_study_on_imagefolder_via_cli(store, capsys):
    fixture = fx.make_imagefolder(store / "data", with_val=True)
    argv = ["study", "--variant", "barrier", "--dataset", "imagefolder", "--data-root", str(fixture.root),
            "--trials", "1", "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--no-progress",
            "--set", "data.m_per_class=2"]
    assert main(argv) == 0
    assert "imagefolder-test_resnet-barrier" in capsys.readouterr().out


def test_wrong_root_is_one_line(tmp_path, capsys):
    code = main(["study", "--dataset", "imagefolder", "--data-root", str(tmp_path / "nowhere"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nowhere" in err


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_study_configs_parse(path):
    from carrot.cli import _unique_keys_loader

    data = yaml.load(path.read_text(), Loader=_unique_keys_loader())  # as `--config` reads it
    data["data"]["root"] = "/data/somewhere"
    cfg = RunConfig.from_dict(data)
    assert cfg.data.image_size == 448 and cfg.model.pretrained
