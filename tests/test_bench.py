"""``carrot.bench``: one finite row per registered variant (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from carrot.bench import bench_variants, main, pk_labels
from carrot.variants import list_variants


def test_bench_rows_cover_every_variant():
    rows = bench_variants(device="cpu", batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=2, warmup=1)
    assert [r["variant"] for r in rows] == list_variants()
    for r in rows:
        for key in ("ms", "ce_ms", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
        assert isinstance(r["within_target"], bool)


@pytest.mark.parametrize("name", list_variants())
def test_the_bench_step_is_the_training_step(name):
    """What the bench times at the embedding level is the variant's real loss and gradient:
    the same as the variant on the batch the trainer would hand it."""
    import torch

    from carrot.bench import FEATURE_DIMS, PROGRESS, EmbeddingModel
    from carrot.train import forward_step
    from carrot.variants import StepBatch, create_variant

    torch.manual_seed(0)
    y = pk_labels(16, 4, 10, "cpu")
    z = torch.randn(16, 32, requires_grad=True)
    variant, twin = create_variant(name).train(), create_variant(name).train()  # stateful: one call each
    neck, head = variant.build_neck(32), torch.nn.Linear(32, 10)
    feats = {k: torch.randn(16, d // 64) for k, d in FEATURE_DIMS.items()} if variant.uses_features else {}
    torch.manual_seed(1)  # nuisance draws its noise from the global generator
    out = forward_step(EmbeddingModel(neck, head, feats), variant, z, y, PROGRESS)
    (g_bench,) = torch.autograd.grad(out.loss, z)
    emb = neck(z)
    torch.manual_seed(1)
    direct = twin(StepBatch(embedding=emb, logits=head(emb), labels=y, head=head, features=feats,
                            progress=PROGRESS))
    (g_direct,) = torch.autograd.grad(direct.loss, z)
    torch.testing.assert_close(out.loss, direct.loss)
    torch.testing.assert_close(g_bench, g_direct)
    assert set(out.terms) == set(direct.terms)


def test_pk_labels_and_cli_table(capsys):
    y = pk_labels(10, 4, 20, "cpu")
    assert len(y) == 10 and len(set(y.tolist())) == 4 and int(y.max()) < 20
    assert main(["--batch", "8", "--classes-in-batch", "4", "--num-classes", "10", "--dim", "16",
                 "--repeats", "1", "--warmup", "1", "--variants", "baseline", "pairwise_confusion",
                 "--resnet50"]) == 0
    out = capsys.readouterr().out
    assert "pairwise_confusion" in out and "ratio" in out
    assert "CUDA only" in out  # --resnet50 on a CPU run says it was skipped


def test_variant_specs_override_hparams():
    from carrot.bench import parse_variant_spec

    assert parse_variant_spec("prototype:metric=mahalanobis,top_m=10,lam=0.5") == (
        "prototype", {"metric": "mahalanobis", "top_m": 10, "lam": 0.5})
    assert parse_variant_spec("nuisance:union=True") == ("nuisance", {"union": True})
    rows = bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1,
                          variants=["prototype:metric=whitening"])
    assert rows[0]["variant"] == "prototype:metric=whitening" and rows[0]["ms"] > 0
    with pytest.raises(ValueError):
        bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1,
                       variants=["prototype:no_such_hparam=1"])
