"""The paper figures of analysis.plots, read back from a real MLflow store.

The module's fixture trains tiny real final runs (split=test) on the ``synthetic`` dataset,
whose classes are named ``g<group>s<sibling>`` (names that differ from the class indices):
two seeds of ``baseline`` and one of ``expansion``. Expected values (the logged statistics,
the reference pairs, their class names and errors) are read from MlflowClient and the runs'
``confusion.npz`` directly, never from analysis/.
"""
from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest

from conftest import module_store, tiny_config

pytestmark = pytest.mark.slow

DATASET, BACKBONE = "synthetic", "test_resnet"
# Small enough to train in seconds: one probe fit per layer (a one-value l2 grid), no run pictures.
TINY = {"data.name": DATASET, "data.synthetic_groups": 4, "data.synthetic_siblings": 3,
        "data.synthetic_per_class": 30, "optim.epochs": 2, "data.batch_size": 32, "eval.probe_max_train": 100,
        "eval.probe_l2_grid": [0.1], "eval.images": False}
RUNS = (("baseline", 0), ("baseline", 1), ("expansion", 0))
STEMS = ("confusion_concentration", "proto_cos_ref", "pair_error_vs_baseline", "db_per_layer", "probe_per_layer",
         "variant_stats_expansion")


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    """Final runs of baseline (2 seeds) and expansion (1 seed); every plot saved once."""
    from carrot.train import run

    root = tmp_path_factory.mktemp("plots_store")
    with module_store(root) as (uri, client):
        ids: dict[tuple[str, int], str] = {}
        for variant, seed in RUNS:  # baseline first: the later run scores its reference pairs
            cfg = tiny_config(**{"variant.name": variant, "split": "test", "seed": seed, **TINY})
            result = run(cfg, run_name=f"final-{variant}-s{seed}", log=lambda s: None)
            client.set_tag(result.run_id, "carrot.role", "final")
            client.set_tag(result.run_id, "carrot.study", f"{DATASET}-{BACKBONE}-{variant}")
            ids[(variant, seed)] = result.run_id

        from analysis import plots
        from analysis.common import load_runs

        out = root / "out"
        written = plots.make_plots(client, load_runs(client, "carrot"), out, log=lambda s: None)
        (group,) = plots.groups(client, load_runs(client, "carrot"), root / "drawn")
        yield {"client": client, "ids": ids, "out": out / "plots" / f"{DATASET}-{BACKBONE}", "written": written,
               "group": group}


@pytest.fixture(scope="module")
def figures(st):
    """Each plot drawn once (not saved), by file stem."""
    from analysis import plots

    figs = {stem: plots.draw(st["group"], stem) for stem in STEMS}
    yield figs
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def read_npz(client, run_id: str, name: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, name, dst_path=tmp)
        with np.load(local) as data:
            return {k: np.array(data[k]) for k in data.files}


# ----------------------------------------------------------------------------- variant statistics
def test_every_declared_statistic_has_its_own_panel(st, figures):
    from carrot.variants import get_variant_class

    run_id = st["ids"][("expansion", 0)]
    logged = {k[len("var/"):] for k in st["client"].get_run(run_id).data.metrics if k.startswith("var/")}
    declared = set(get_variant_class("expansion").statistics)
    assert logged == declared and len(declared) == 6, (logged, declared)
    axes = visible_axes(figures["variant_stats_expansion"])
    titles = [ax.get_title() for ax in axes]
    assert titles == list(get_variant_class("expansion").statistics), "one panel each, in the declared order"
    for ax in axes:
        assert ax.get_lines(), f"panel {ax.get_title()} draws nothing"


def test_statistics_the_table_does_not_list_are_drawn_after_the_listed_ones_in_layer_order():
    from analysis.plots import order_stat_keys

    keys = {"var/classes_used", "var/rho_layer10", "var/db_layer2", "var/db_embedding", "var/db_layer10",
            "var/rho_layer2", "var/brand_new", "var/l_bhat", "train/ce"}
    assert order_stat_keys(keys, "bhattacharyya") == [
        "var/db_layer2", "var/db_layer10", "var/db_embedding", "var/rho_layer2", "var/rho_layer10",
        "var/l_bhat", "var/classes_used", "var/brand_new"]
    assert order_stat_keys({"var/b", "var/a10", "var/a9"}, "unknown_variant") == ["var/a9", "var/a10", "var/b"]


def test_every_statistic_label_fits_beside_its_panel():
    import matplotlib.pyplot as plt

    from analysis import plots

    with plt.rc_context(plots.STYLE):
        for variant, stats in plots.VARIANT_STATS.items():
            names = [s.replace("*", "layer1") for s in stats]
            fig, axes = plots._grid(len(names))
            for ax, name in zip(axes, names):
                ax.plot([1, 2, 3], [0.0, 0.5, 1.0])
                ax.set_title(name)
                plots._ylabel(ax, plots.stat_label(name))
            fig.suptitle(f"{variant}: its statistics\nsynthetic / test_resnet (final runs, test split)")
            assert plots.texts_overlapping(fig) == [] and plots.texts_outside(fig) == [], variant
            plt.close(fig)


# ----------------------------------------------------------------------------- pair error
def test_pair_error_labels_every_reference_pair_with_class_names_and_keeps_every_marker_visible(st, figures):
    from carrot import contract

    client, ids = st["client"], st["ids"]
    baseline = [read_npz(client, ids[("baseline", s)], "confusion.npz") for s in (0, 1)]
    pooled = sum(np.asarray(b["confusion"][-1], dtype=np.int64) for b in baseline)
    pairs = contract.confusable_pairs(pooled, top_n=20)
    names = [str(n) for n in baseline[0]["class_names"]]
    assert len(pairs) >= 2 and names[:2] == ["g0s0", "g0s1"], (pairs, names)
    want = [f"{names[i]}↔{names[j]}" for i, j in pairs]

    fig = figures["pair_error_vs_baseline"]
    (ax,) = visible_axes(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == want
    collections = {c.get_label(): c for c in ax.collections if c.get_label().endswith(")")}
    expansion_cm = read_npz(client, ids[("expansion", 0)], "confusion.npz")["confusion"][-1]
    expected = {
        "baseline (n=2)": np.mean([contract.pair_error(b["confusion"][-1], pairs) for b in baseline], axis=0),
        "expansion (n=1)": contract.pair_error(expansion_cm, pairs),
    }
    assert set(collections) == set(expected), list(collections)
    rows = {}
    for label, errors in expected.items():
        offsets = collections[label].get_offsets()
        assert len(offsets) == len(pairs), label
        np.testing.assert_allclose(offsets[:, 0], errors, atol=1e-12, err_msg=label)
        rows[label] = offsets[:, 1]
    # one row per pair (in reference order), the two markers of a row apart so neither hides the other
    gap = rows["expansion (n=1)"] - rows["baseline (n=2)"]
    assert (np.abs(gap) > 0.2).all() and (np.abs(gap) < 0.8).all(), gap
    np.testing.assert_allclose((rows["baseline (n=2)"] + rows["expansion (n=1)"]) / 2, np.arange(len(pairs)))
    assert ax.get_xlim()[0] == 0


# ----------------------------------------------------------------------------- axes, legends, titles
def test_probe_bars_start_at_zero(figures):
    (ax,) = visible_axes(figures["probe_per_layer"])
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 100
    assert len(ax.patches) >= 2 * 2, "a bar per variant and layer"


def test_value_axes_start_at_zero_or_carry_a_break_mark(figures):
    from analysis.plots import BREAK_GID

    checked = 0
    for stem, fig in figures.items():
        for ax in visible_axes(fig):
            if stem == "pair_error_vs_baseline":  # pairs on y, errors on x
                assert ax.get_xlim()[0] == 0
                continue
            if not ax.get_lines() and not ax.patches:
                continue
            lo, hi = ax.get_ylim()
            marked = any(line.get_gid() == BREAK_GID for line in ax.get_lines())
            if ax.get_yscale() == "log":
                assert "log scale" in ax.get_ylabel(), (stem, ax.get_title())
            else:
                assert lo <= 0 <= hi or marked, (stem, ax.get_title(), lo, hi)
            checked += 1
    assert checked >= 6 + 4


def test_zero_is_reached_unless_the_data_would_be_squeezed_then_the_axis_is_marked():
    import matplotlib.pyplot as plt

    from analysis.plots import BREAK_GID, _zero_or_break

    fig, (wide, narrow, negative) = plt.subplots(1, 3)
    wide.plot([1, 2, 3], [2.0, 5.0, 8.0])
    narrow.plot([1, 2, 3], [120.0, 120.5, 121.0])
    negative.plot([1, 2, 3], [-50.0, -50.2, -50.1])
    for ax in (wide, narrow, negative):
        _zero_or_break(ax)
    marks = {ax: [line for line in ax.get_lines() if line.get_gid() == BREAK_GID] for ax in (wide, narrow, negative)}
    assert wide.get_ylim()[0] == 0 and not marks[wide]
    assert narrow.get_ylim()[0] > 100 and len(marks[narrow]) == 2
    assert max(marks[narrow][0].get_ydata()) < 0.1, "the mark sits at the bottom, away from 0"
    assert negative.get_ylim()[1] < -49 and min(marks[negative][0].get_ydata()) > 0.9
    plt.close(fig)


def test_legends_sit_outside_every_axes(figures):
    seen = 0
    for stem, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in visible_axes(fig):
                assert not box.overlaps(ax.get_window_extent(renderer)), (stem, ax.get_title())
            seen += 1
    assert seen >= 5, "every figure but the single-variant statistics has a legend"


def test_every_text_fits_inside_its_figure_and_none_overlaps_another(figures):
    from analysis.plots import texts_outside, texts_overlapping

    for stem, fig in figures.items():
        assert texts_outside(fig) == [], stem
        assert texts_overlapping(fig) == [], stem
        assert fig.get_suptitle().endswith(f"{DATASET} / {BACKBONE} (final runs, test split)"), stem


def test_the_text_checks_report_a_title_past_the_edge_and_a_label_under_the_title():
    import matplotlib.pyplot as plt

    from analysis.plots import texts_outside, texts_overlapping

    fig, ax = plt.subplots(figsize=(3, 2))
    title = "a title far too long to fit on a figure three inches wide at this size"
    fig.suptitle(title)
    ax.text(0.5, 1.0, "under the title", transform=fig.transFigure, ha="center", va="top")
    ax.set_axis_off()
    assert texts_outside(fig) == [title]
    assert sorted(map(sorted, texts_overlapping(fig))) == [sorted([title, "under the title"])]
    plt.close(fig)


# ----------------------------------------------------------------------------- files
def test_each_plot_is_saved_as_png_at_300_dpi_with_pdf_and_svg_beside_it(st):
    from PIL import Image

    assert sorted(p.name for p in st["written"]) == sorted(f"{stem}.png" for stem in STEMS)
    for stem in STEMS:
        png, pdf, svg = (st["out"] / f"{stem}.{ext}" for ext in ("png", "pdf", "svg"))
        with Image.open(png) as image:
            assert image.info["dpi"] == pytest.approx((300, 300), abs=0.01), stem
            assert "Software" not in image.info, stem
            assert min(image.size) > 900, (stem, image.size)  # 300 dpi of a figure at least 3 inches wide
        assert pdf.read_bytes()[:5] == b"%PDF-" and b"/CreationDate" not in pdf.read_bytes(), stem
        text = svg.read_text()
        assert text.startswith("<?xml") and "<svg" in text and "<dc:date>" not in text, stem


def test_saved_files_are_identical_when_drawn_again(st, tmp_path):
    from analysis import plots

    g = copy.copy(st["group"])
    g.out = tmp_path / "again"
    for stem in ("pair_error_vs_baseline", "variant_stats_expansion"):
        g.save(plots.draw(g, stem), stem)
        for ext in plots.FORMATS:
            again, first = tmp_path / "again" / f"{stem}.{ext}", st["out"] / f"{stem}.{ext}"
            assert again.read_bytes() == first.read_bytes(), (stem, ext)


def test_help_describes_the_plots_without_citing_a_missing_file(capsys):
    from analysis.plots import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "SPEC" not in text and "300 dpi" in text and "variant_stats_<variant>" in text
