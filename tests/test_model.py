"""The model's feature taps: pooled widths match timm's feature_info for NCHW, NHWC and token layouts."""
from __future__ import annotations

import pytest
import torch

from carrot.model import CarrotModel, ModelError, create_backbone


@pytest.mark.parametrize("name, size", [("test_resnet", 64), ("test_vit", 160), ("test_convnext", 64),
                                        ("swin_tiny_patch4_window7_224", 224)])
def test_pooled_features_have_the_stage_widths(name, size):
    backbone = create_backbone(name)
    model = CarrotModel(backbone, torch.nn.Identity(), num_classes=7)
    out = model(torch.randn(2, 3, size, size), with_features=True)
    widths = {e["module"]: e["num_chs"] for e in backbone.feature_info}
    assert len(out.features) == min(4, len(widths))
    for layer, feats in out.features.items():
        assert feats.shape == (2, widths[layer]) and feats.dtype == torch.float32
    assert out.logits.shape == (2, 7) and out.embedding.shape == (2, backbone.num_features)
    assert model(torch.randn(2, 3, size, size)).features == {}


def test_probe_layer_mean_matches_manual_pooling():
    backbone = create_backbone("test_resnet")
    model = CarrotModel(backbone, torch.nn.Identity(), num_classes=3, probe_layers=["layer2"]).eval()
    x = torch.randn(2, 3, 64, 64)
    grabbed = {}
    backbone.layer2.register_forward_hook(lambda m, a, o: grabbed.setdefault("x", o))
    out = model(x, with_features=True)
    torch.testing.assert_close(out.features["layer2"], grabbed["x"].mean(dim=(2, 3)))


def test_unknown_probe_layer_and_weights_file_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="probe layer"):
        CarrotModel(create_backbone("test_resnet"), torch.nn.Identity(), 3, probe_layers=["nope"])
    with pytest.raises(ModelError, match="not found"):
        create_backbone("test_resnet", pretrained_path=str(tmp_path / "missing.safetensors"))


def test_local_pretrained_weights_are_loaded(tmp_path, capsys):
    source = create_backbone("test_resnet")
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    state = torch.get_rng_state()
    loaded = create_backbone("test_resnet", pretrained_path=str(path))
    assert torch.equal(torch.get_rng_state(), state)  # the check's seeds leave the run's generator alone
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert "note:" not in capsys.readouterr().err


def test_weights_of_another_model_are_refused_and_missing_ones_named(tmp_path, capsys):
    """timm drops the keys it does not know when it loads a file for a model without a
    classifier: a file of another model left every weight random, and said nothing."""
    source = create_backbone("test_resnet").state_dict()
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "head_only.pth")
    torch.save({f"other.{k}": v for k, v in source.items()}, tmp_path / "renamed.pth")
    for name in ("head_only.pth", "renamed.pth"):
        with pytest.raises(ModelError, match=rf"^none of the weights of backbone 'test_resnet' are in .*{name}"):
            create_backbone("test_resnet", pretrained_path=str(tmp_path / name))
    first = next(k for k in source if k.endswith("weight") and source[k].dim() == 4)
    torch.save({k: v for k, v in source.items() if k != first}, tmp_path / "part.pth")
    capsys.readouterr()
    loaded = create_backbone("test_resnet", pretrained_path=str(tmp_path / "part.pth")).state_dict()
    assert f"note: 1 of {sum(1 for _ in create_backbone('test_resnet').parameters())} weight tensors of " \
           f"backbone 'test_resnet' are not in {tmp_path / 'part.pth'} and keep their random initialisation " \
           f"(first: {first})" in capsys.readouterr().err
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if k != first)


@pytest.mark.parametrize("name, size", [("test_resnet", 64), ("test_vit", 160), ("test_convnext", 64),
                                        ("swin_tiny_patch4_window7_224", 224)])
def test_forward_intermediates_equal_the_hooks(name, size):
    """timm's forward_intermediates (one pass, NCHW whatever the layout) gives the embedding and
    the pooled stage features that forward hooks on the same modules give."""
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    fast = CarrotModel(backbone, torch.nn.Identity(), num_classes=5)
    hooked = CarrotModel(backbone, torch.nn.Identity(), num_classes=5, taps="hooks")
    hooked.head.load_state_dict(fast.head.state_dict())
    assert fast._stage_index is not None and hooked._stage_index is None
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = fast(x, with_features=True), hooked(x, with_features=True)
        plain = backbone(x)
    torch.testing.assert_close(a.embedding, plain)
    torch.testing.assert_close(a.embedding, b.embedding)
    assert list(a.features) == list(b.features) == fast.probe_layers
    for layer in a.features:
        torch.testing.assert_close(a.features[layer], b.features[layer], msg=layer)


def test_a_weights_file_is_checked_once_per_process_and_builds_the_same_model(tmp_path, capsys, monkeypatch):
    """Every trial of a study builds its backbone: the check (three builds) runs for the first
    one only; later builds give the same weights, and the note is not repeated."""
    import timm

    source = create_backbone("test_resnet").state_dict()
    first = next(k for k in source if k.endswith("weight") and source[k].dim() == 4)
    torch.save({k: v for k, v in source.items() if k != first}, tmp_path / "part.pth")
    builds = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: builds.append(a) or create(*a, **kw))
    capsys.readouterr()
    one = create_backbone("test_resnet", pretrained_path=str(tmp_path / "part.pth")).state_dict()
    assert len(builds) == 3 and "note: 1 of" in capsys.readouterr().err
    two = create_backbone("test_resnet", pretrained_path=str(tmp_path / "part.pth")).state_dict()
    assert len(builds) == 4 and capsys.readouterr().err == ""
    assert all(torch.equal(one[k], two[k]) for k in one)  # the missing tensor too: one seed for both
