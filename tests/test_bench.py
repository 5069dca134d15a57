"""``carrot.bench``: every section of the report on a tiny configuration (no timing assertions)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from carrot.bench import SECTIONS, bench_variants, main, pk_labels
from carrot.variants import create_variant, list_variants

TINY = ["--batch", "8", "--classes-in-batch", "4", "--num-classes", "10", "--dim", "16", "--scaling", "10x16,20x8",
        "--repeats", "1", "--warmup", "0", "--train-step-repeats", "1"]


def test_bench_rows_cover_every_variant():
    rows = bench_variants(device="cpu", batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=2, warmup=1)
    assert [r["variant"] for r in rows] == list_variants()
    for r in rows:
        for key in ("ms", "ce_ms", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
        assert isinstance(r["within_target"], bool)
        variant = create_variant(r["variant"])
        has_floor = bool(variant.floor_products(8, 10, 16) or variant.floor_normal_draws(8, 16))
        assert (r["floor_ratio"] is not None) == has_floor == (r["over_floor"] is not None), r["variant"]
        if has_floor:
            assert r["floor_ratio"] > 0 and r["over_floor"] == pytest.approx(r["ratio"] / r["floor_ratio"])


@pytest.mark.parametrize("name", list_variants())
def test_floor_products_are_matrix_shapes(name):
    """A floor is a list of (n, k, m) products with positive sizes; the variants with a second head
    pass or a K x K Gram declare one (expansion's default folds z+'s head pass into the head's)."""
    products = create_variant(name).floor_products(64, 200, 2048)
    assert all(len(p) == 3 and all(isinstance(v, int) and v > 0 for v in p) for p in products)
    assert bool(products) == (name in ("nuisance", "prototype"))
    if name == "expansion":
        assert len(create_variant(name, detach_stats=False).floor_products(64, 200, 2048)) == 2
        assert len(create_variant(name, mode="supcon").floor_products(64, 200, 2048)) == 2
    assert create_variant(name).floor_normal_draws(64, 2048) == (64 * 2048 if name == "nuisance" else 0)
    if name == "nuisance":
        assert create_variant(name, n_aug=3).floor_normal_draws(64, 2048) == 3 * 64 * 2048
    if name == "prototype":  # the Gram rows of the class slots the step uses: C on CPU, B by default
        assert [p[0] for p in products] == [64, 64]
        assert [p[0] for p in create_variant(name).floor_products(64, 200, 2048, slots=16)] == [16, 16]


@pytest.mark.parametrize("name", list_variants())
def test_the_bench_step_is_the_training_step(name):
    """What the bench times at the embedding level is the variant's real loss and gradient:
    the same as the variant on the batch the trainer would hand it."""
    import torch

    from carrot.bench import FEATURE_DIMS, PROGRESS, EmbeddingModel
    from carrot.train import forward_step
    from carrot.variants import StepBatch

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
    assert main([*TINY, "--device", "cpu", "--study-trials", "0", "--variants", "baseline", "pairwise_confusion"]) == 0
    out = capsys.readouterr().out
    assert "pairwise_confusion" in out and "ratio" in out and "repeats IQR" in out and "targets" in out
    assert "SKIP  cuda barrier step without a host sync" in out  # nothing measured on a CPU-only run


def test_sync_debug_without_cuda_checks_the_cuda_routes_on_the_cpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([*TINY, "--sync-debug", "--variants", "baseline", "barrier", "bhattacharyya"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["baseline"], ["barrier"],
                                                                                ["bhattacharyya"])]
    assert rows == [["baseline", "True"], ["barrier", "True"], ["bhattacharyya", "True"]]
    assert "needs CUDA" in out  # the check on the GPU itself


def test_variant_specs_override_hparams():
    from carrot.bench import parse_variant_spec

    assert parse_variant_spec("prototype:metric=mahalanobis,top_m=10,lam=0.5") == (
        "prototype", {"metric": "mahalanobis", "top_m": 10, "lam": 0.5})
    assert parse_variant_spec("nuisance:union=True") == ("nuisance", {"union": True})
    assert parse_variant_spec("nuisance:union=false,lam=1e-3") == ("nuisance", {"union": False, "lam": 1e-3})
    rows = bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1,
                          variants=["prototype:metric=whitening"])
    assert rows[0]["variant"] == "prototype:metric=whitening" and rows[0]["ms"] > 0
    with pytest.raises(ValueError):
        bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1,
                       variants=["prototype:no_such_hparam=1"])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_json_holds_every_section(tmp_path, monkeypatch):
    """The whole report on a tiny configuration: each section is in the JSON with its figures
    (the default study with one worker, in temporary stores that leave nothing behind)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    names = ["baseline", "prototype", "barrier"]
    assert main([*TINY, "--device", "cpu", "--variants", *names, "--study-trials", "2", "--study-epochs", "1",
                 "--study-jobs", "1", "--limit-per-class", "10", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report) == list(SECTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no mlruns/ or studies/ here

    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["bench_seconds"] > 0
    rows = report["variants"]["rows"]
    assert [r["variant"] for r in rows] == names
    assert all(_finite(r["ratio"]) and _finite(r["ms"]) and _finite(r["ce_ms"]) for r in rows)
    assert all(r["ratio_iqr"][0] <= r["ratio"] <= r["ratio_iqr"][1] for r in rows)
    assert _finite(rows[1]["floor_ratio"]) and rows[0]["floor_ratio"] is None  # prototype has a floor
    assert [(c["num_classes"], c["dim"]) for c in report["scaling"]["configs"]] == [(10, 16), (20, 8)]
    for row in report["scaling"]["rows"]:
        assert _finite(row["K=10,D=16"]) and _finite(row["K=20,D=8"])
    assert [r["variant"] for r in report["memory"]["rows"]] == names
    assert all(r["peak_bytes"] > 0 and r["ce_peak_bytes"] > 0 for r in report["memory"]["rows"])
    steps = report["train_step"]["rows"]
    assert [r["variant"] for r in steps] == names and steps[0]["backbone"] == "test_resnet"
    assert all(_finite(r["ratio"]) and _finite(r["ms"]) for r in steps)
    assert report["sync_routes"] == [{"variant": v, "sync_free": True, "sync": ""} for v in names]

    study = report["study"]
    assert study["trials"] == 2 and study["epochs"] == 1 and study["jobs"] is None
    assert study["jobs1"]["complete"] + study["jobs1"]["pruned"] == 2 and study["jobs1"]["trials_per_hour"] > 0
    assert study["pruning"] == {"epochs_trained": 2, "epochs_unpruned": 2, "saved_fraction": 0.0}
    shares = study["shares"]
    assert shares["runs"] == 2 and shares["seconds"]["run_s"] > 0
    for key in ("logging", "study", "diagnostics", "probes", "diagnostics_with_probes", "training", "pictures"):
        assert 0.0 <= shares[key] < 1.0, key
    assert shares["study"] > 0  # every trial reports to Optuna
    assert shares["logging"] + shares["study"] + shares["training"] < 1.0  # three parts of the time, apart
    assert 0 < shares["pictures"] < shares["logging"]  # every trial's pictures, a part of its logging
    assert shares["logging_s_per_run"] == pytest.approx(shares["seconds"]["logging_s"] / 2)
    assert shares["run_s_per_run"] == pytest.approx(shares["seconds"]["run_s"] / 2)
    assert 0 < shares["pictures_s_per_run"] == pytest.approx(shares["seconds"]["pictures_s"] / 2)
    assert report["cuda"] is None

    targets = {t["target"]: t for t in report["targets"]}
    assert targets["cpu term prototype <= 3x CE head or 1.5x its floor"]["value"] == rows[1]["ratio"]
    assert targets["cpu term prototype <= 3x CE head or 1.5x its floor"]["limit"] == max(
        3.0, 1.5 * rows[1]["floor_ratio"])
    assert targets["cpu term baseline <= 3x CE head"]["limit"] == 3.0
    assert targets["MLflow logging <= 2% of trial time"]["value"] == shares["logging"]
    assert targets["diagnostics with probes <= 20% of trial time"]["value"] == shares["diagnostics_with_probes"]
    assert targets["pruning saves >= 1/3 of the epochs"]["passed"] is False  # two trials: nothing to prune
    assert targets["cuda barrier step without a host sync"]["passed"] is None
    assert targets["cuda routes of every variant without a host-sync op (checked on cpu)"]["value"] == 0.0
    assert all(t["passed"] in (True, False, None) for t in report["targets"])


def test_the_training_step_of_baseline_alone_is_timed():
    from carrot.bench import bench_train_step

    rows = bench_train_step(torch.device("cpu"), ["baseline"], repeats=1, warmup=0, **{"data.limit_per_class": 10})
    assert [r["variant"] for r in rows] == ["baseline"] and _finite(rows[0]["ms"]) and rows[0]["ms"] > 0


@pytest.mark.heavy
def test_study_with_two_workers(tmp_path, monkeypatch):
    """The second study of the report: the same default study with two worker processes."""
    from carrot.bench import bench_study

    monkeypatch.chdir(tmp_path)
    study = bench_study(2, jobs=2, device="cpu", **{"optim.epochs": 1, "data.limit_per_class": 10})
    assert study["jobs"]["jobs"] == 2 and study["jobs"]["failed"] == 0
    assert study["jobs"]["complete"] + study["jobs"]["pruned"] >= 2 and study["jobs"]["trials_per_hour"] > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,products,draws", [("nuisance", 5, 8 * 16), ("prototype", 2, 0), ("baseline", 0, 0)])
def test_the_floor_step_runs_the_declared_products_and_draws(name, products, draws):
    """The floor step is the CE head's step plus each declared product (with the sizes
    declared) and the declared normal draws, nothing else of the term."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from carrot.bench import EmbeddingBench

    bench = EmbeddingBench(torch.device("cpu"), 8, 4, 10, 16, [name])
    floor = bench.floor_step(bench.variants[0])
    if not products and not draws:
        assert floor is None
        return

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm, self.normal = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default:
                self.mm.append((args[0].shape[0], args[0].shape[1], args[1].shape[1]))
            if func in (torch.ops.aten.normal_.default, torch.ops.aten.randn.default):
                self.normal.append(out.numel())
            return out

    with Calls() as calls:
        floor()
    expected = bench.variants[0].floor_products(8, 10, 16, slots=4)
    assert len(expected) == products
    # the CE head's own two backward products (its forward is an addmm), then the declared ones
    assert len(calls.mm) == 2 + products and sorted(calls.mm[2:]) == sorted(expected)
    assert calls.normal == ([draws] if draws else [])


def test_cpu_target_is_3x_or_1_5x_the_floor_where_that_is_more():
    """A floor relaxes the 3x target (nuisance's products alone are 3.4x) and never tightens
    it: a step at 2.9x with a floor of 1.7x meets it."""
    from carrot.bench import cpu_limit, within_cpu_target

    def row(ratio, floor):
        return {"ratio": ratio, "floor_ratio": floor, "over_floor": None if floor is None else ratio / floor}

    assert cpu_limit(row(1.0, None)) == 3.0 and cpu_limit(row(1.0, 1.7)) == 3.0
    assert cpu_limit(row(1.0, 3.4)) == pytest.approx(5.1)
    assert within_cpu_target(row(2.9, 1.7)) and within_cpu_target(row(5.0, 3.4))
    assert not within_cpu_target(row(3.1, None)) and not within_cpu_target(row(3.1, 1.7))
    assert not within_cpu_target(row(5.2, 3.4))


def test_ratio_quartiles_match_numpy():
    import numpy as np

    from carrot.bench import median_ratio, ratio_quartiles

    rng = np.random.default_rng(0)
    times, reference = list(rng.uniform(2, 5, 21)), list(rng.uniform(1, 2, 21))
    ratios = np.array(times) / np.array(reference)
    assert ratio_quartiles(times, reference) == pytest.approx(list(np.percentile(ratios, [25, 75])), rel=1e-12)
    assert median_ratio(times, reference) == pytest.approx(float(np.median(ratios)), rel=1e-12)
    assert ratio_quartiles([3.0], [2.0]) == [1.5, 1.5]


@pytest.mark.parametrize("argv, expected", [
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["--study-jobs", "two"], "argument --study-jobs: expected an integer >= 1, got 'two'"),
    (["--scaling", "1x64"], "(K >= 2, D >= 1), got '1x64'"),
    (["--variants", "baseline", "nosuch"], "--variants nosuch: unknown variant 'nosuch'"),
    (["--variants", "bhattacharyya:top_M=abc"], "invalid top_M='abc' for variant 'bhattacharyya': expected an integer"),
    (["--variants", "prototype:metric=foo"], "metric must be one of"),
    (["--classes-in-batch", "80"], "--classes-in-batch must be at most --batch (64) and --num-classes (200), got 80"),
    (["--json", "{missing}/bench.json"], "does not exist"),
    (["--json", "{tmp}"], "is a folder; expected the path of a file to write"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device here")]))
def test_bad_input_is_one_line_before_anything_runs(argv, expected, tmp_path, capsys):
    """Bad input stops the bench with exit status 2 and one error line naming the flag and what
    it expects, before the first figure is printed (a two-minute run is not spent first; a folder
    as --json failed after it)."""
    argv = [a.replace("{missing}", str(tmp_path / "missing")).replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu", "--study-trials", "0", *argv])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing timed, nothing printed
    assert expected in captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err


def test_a_signal_stops_the_bench_between_repeats(tmp_path):
    """Ctrl-C was only noted until every section had run (minutes); the bench now stops at the
    next repeat with one line, exit 130, and no --json file."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", "bench", "--device", "cpu", "--study-trials", "0",
                             "--variants", "baseline", "--repeats", "1000000", "--json", str(tmp_path / "b.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().startswith("carrot bench on")  # printed before the first timing
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "carrot: interrupted by SIGINT: the bench stopped (--json not written)"
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_bench_throughput_bad_flag_is_one_line(capsys):
    from carrot.cli import main as cli_main

    with pytest.raises(SystemExit) as stop:
        cli_main(["bench", "throughput", "--batch-size", "-1"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        "carrot bench throughput: error: argument --batch-size: expected an integer >= 2, got '-1' "
        "(see `carrot bench throughput --help`)"]


@pytest.mark.parametrize("argv, line", [
    (["--device", "tpu"], "carrot: error: invalid device='tpu': expected one of ('auto', 'cpu', 'cuda')"),
    (["--variants", "baseline,expanson"], "carrot: error: unknown variant 'expanson' (did you mean 'expansion'?)"),
])
def test_bench_throughput_bad_config_is_one_line_through_the_cli(capsys, argv, line):
    """`carrot bench throughput` checks every configuration before it makes an image, and goes
    through the command line's handler of bad input: one line, exit 2, nothing printed before."""
    from carrot.cli import main as cli_main

    assert cli_main(["bench", "throughput", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line)


def test_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half way leaves the previous FILE as it was and no partial file."""
    from pathlib import Path

    out = tmp_path / "bench.json"
    out.write_text('{"previous": true}\n')
    write_text = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        write_text(self, text[:20])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        main([*TINY, "--device", "cpu", "--study-trials", "0", "--variants", "baseline", "--json", str(out)])
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_bench_throughput_runs_the_plain_loop_and_the_harness(capsys):
    """`carrot bench throughput` on a tiny generated ImageFolder: a row for the plain timm loop
    and one per variant, each ratio the row's images/s over the plain loop's, and a variant's
    'of baseline' its images/s over baseline's (as printed, to their rounding)."""
    from carrot.cli import main as cli_main

    assert cli_main(["bench", "throughput", "--backbone", "test_resnet", "--image-size", "32", "--classes", "2",
                     "--per-class", "10", "--epochs", "2", "--workers", "0", "--device", "cpu", "--batch-size", "4",
                     "--variants", "baseline,pairwise_confusion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines:
        for name in ("plain timm", "harness baseline", "harness pairwise_confusion"):
            if line.startswith(name + " "):
                rows[name] = line[len(name):].split()
    assert sorted(rows) == ["harness baseline", "harness pairwise_confusion", "plain timm"]
    def quotient(a: float, b: float) -> tuple[float, float]:
        """a / b of two rates printed to 0.1, and how far the printing can move it (the
        quotient is printed to 0.001)."""
        return a / b, 0.0005 + 0.05 / b + 0.05 * a / b ** 2

    plain = float(rows["plain timm"][0])
    assert plain > 0 and float(rows["plain timm"][1]) == 1.0
    for name in ("harness baseline", "harness pairwise_confusion"):
        rate, ratio = float(rows[name][0]), float(rows[name][1])
        want, slack = quotient(rate, plain)
        assert rate > 0 and ratio == pytest.approx(want, abs=slack)
    pc = rows["harness pairwise_confusion"]
    assert pc[2:] == [pc[2], "of", "baseline"]
    want, slack = quotient(float(pc[0]), float(rows["harness baseline"][0]))
    assert float(pc[2]) == pytest.approx(want, abs=slack)


def test_a_stateful_variant_is_timed_after_it_has_seen_every_class():
    """prototype keeps per-class state across steps; the bench times it as it trains once every
    one of the K classes has been seen (not with the bench batch's 4 only), and then times the
    bench batch."""
    from carrot.bench import EmbeddingBench

    bench = EmbeddingBench(torch.device("cpu"), 8, 4, 10, 16, ["prototype", "baseline"])
    prototype = bench.variants[0]
    assert bool(prototype.seen.all()) and prototype.seen.shape == (10,)
    assert torch.equal(bench.y, pk_labels(8, 4, 10, "cpu"))
