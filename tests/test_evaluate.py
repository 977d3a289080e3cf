import dataclasses
import json
import logging

import matplotlib.pyplot
import matplotlib.text
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ctdiff.evaluate import (
    append_history,
    baseline_predictors,
    evaluate_cases,
    load_metrics,
    metrics_json,
    read_history,
)
from ctdiff.interpolate import thin_positions
from ctdiff.metrics import in_between_mask, score
from ctdiff.report import (
    case_views_figure,
    findings,
    markdown_table,
    table_rows,
    uncertainty_views_figure,
    write_report,
)
from ctdiff.store import CaseStore
from ctdiff.volume import Volume

WINDOW = (40.0, 400.0)
WIDE = (0.0, 4000.0)  # [-2000, 2000] HU: windowing is affine on the analytic volumes below


def _pair(seed: int, size: int = 16):
    rng = np.random.default_rng(seed)
    truth = np.clip(rng.random((6, size, size)) * 0.4 + np.linspace(0, 0.6, size), 0, 1)
    pred = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    return pred.astype(np.float32), truth.astype(np.float32)


def _skimage_ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([
        structural_similarity(t.astype(np.float64), p.astype(np.float64), data_range=1.0,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for p, t in zip(pred, truth)
    ]))


# -- metrics ---------------------------------------------------------------------------------------


def test_psnr_and_ssim_match_scikit_image():
    pred, truth = _pair(0, size=24)
    got = score(pred, truth)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(truth, pred, data_range=1.0), abs=1e-4)
    assert got["ssim"] == pytest.approx(_skimage_ssim(pred, truth), abs=1e-5)
    mask = np.array([False, True, True, False, True, False])
    got = score(pred, truth, mask)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(truth[mask], pred[mask], data_range=1.0), abs=1e-4)
    assert got["ssim"] == pytest.approx(_skimage_ssim(pred[mask], truth[mask]), abs=1e-5)
    assert score(truth, truth) == {"psnr": float("inf"), "ssim": pytest.approx(1.0)}


def test_score_refuses_mismatched_inputs():
    pred, truth = _pair(1)
    with pytest.raises(ValueError, match="same"):
        score(pred[:5], truth)
    with pytest.raises(ValueError, match="no slice"):
        score(pred, truth, np.zeros(6, bool))


@pytest.mark.parametrize("thick_mm, pattern", [(5.0, [1, 1, 0, 1, 1]), (3.0, [1, 0, 1]), (2.0, [1, 1])])
def test_in_between_mask(thick_mm, pattern):
    thick_z = -40.3 + thick_mm * np.arange(4)
    thin_z = thin_positions(thick_z, thick_mm, 1.0)
    assert len(thin_z) == 4 * len(pattern)
    np.testing.assert_array_equal(in_between_mask(thick_z, thin_z), np.tile(np.array(pattern, bool), 4))


# -- baselines -------------------------------------------------------------------------------------


def _analytic(hu_of_z, thick_z: np.ndarray, size: int = 8) -> tuple[Volume, Volume]:
    """Thick and thin volumes sampling hu_of_z(z) + 10 x at their slice centres (no slab averaging)."""
    thin_z = thin_positions(thick_z, 5.0, 1.0)
    column = 10 * np.arange(size)[None, None, :]

    def volume(z, dz):
        hu = np.broadcast_to(hu_of_z(z)[:, None, None] + column, (len(z), size, size))
        return Volume(hu=np.round(hu).astype(np.int16), spacing_mm=(dz, 1.0, 1.0), z_mm=z)

    return volume(thick_z, 5.0), volume(thin_z, 1.0)


def _inside(thick: Volume, thin: Volume) -> np.ndarray:
    return (thin.z_mm >= thick.z_mm[0]) & (thin.z_mm <= thick.z_mm[-1])


def test_linear_reproduces_a_volume_linear_in_z():
    thick, thin = _analytic(lambda z: 30 * z - 500, 5.0 * np.arange(5))
    pred = baseline_predictors(WIDE)["linear"](thick, thin)
    inside = _inside(thick, thin)
    assert inside.sum() == 21
    np.testing.assert_allclose(pred[inside], thin.window(*WIDE)[inside], atol=1e-6)


def test_cubic_reproduces_a_volume_cubic_in_z():
    thick, thin = _analytic(lambda z: (z - 10.0) ** 3, 5.0 * np.arange(5))
    predictors = baseline_predictors(WIDE)
    inside = _inside(thick, thin)
    truth = thin.window(*WIDE)[inside]
    np.testing.assert_allclose(predictors["cubic"](thick, thin)[inside], truth, atol=1e-5)
    assert np.abs(predictors["linear"](thick, thin)[inside] - truth).max() > 0.01  # the test can fail


def test_nearest_takes_the_slab_a_thin_slice_lies_in():
    thick, thin = _analytic(lambda z: 7 * z, 5.0 * np.arange(5) + 0.4)
    pred = baseline_predictors(WIDE)["nearest"](thick, thin)
    slab = np.floor((thin.z_mm - (thick.z_mm[0] - 2.5)) / 5.0).astype(int)  # slab k spans z_k +- 2.5 mm
    np.testing.assert_array_equal(slab, np.repeat(np.arange(5), 5))
    np.testing.assert_array_equal(pred, thick.window(*WIDE)[slab])


def test_baselines_window_before_they_interpolate():
    # HU -2000 and 0 around a window [-160, 240]: windowed first, the midpoint is (0 + 0.4) / 2;
    # interpolated first it would be window(-1000) = 0.
    z = np.array([0.0, 5.0])
    thick = Volume(hu=np.array([-2000, 0], np.int16)[:, None, None].repeat(2, 1).repeat(2, 2),
                   spacing_mm=(5.0, 1.0, 1.0), z_mm=z)
    thin = Volume(hu=np.zeros((1, 2, 2), np.int16), spacing_mm=(1.0, 1.0, 1.0), z_mm=np.array([2.5]))
    np.testing.assert_allclose(baseline_predictors(WINDOW)["linear"](thick, thin), 0.2, atol=1e-6)


# -- evaluation on a tiny store ----------------------------------------------------------------------

NOISE = {"c-good": 0.005, "c-bad": 0.08, "c-mid": 0.02}  # the fake model's error per case


def _blob_case(seed: int, size: int = 32, n_thick: int = 4) -> tuple[Volume, Volume]:
    """A disc whose radius changes along z, with noise; thick slices are 5-slice slab means."""
    rng = np.random.default_rng(seed)
    thick_z = -20.0 + 5.0 * np.arange(n_thick)
    thin_z = thin_positions(thick_z, 5.0, 1.0)
    yy, xx = np.mgrid[:size, :size]
    radius = 7 + 4 * np.sin(thin_z / 3 + seed)[:, None, None]  # (D, 1, 1)
    thin_hu = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2, 150.0, -100.0)
    thin_hu = thin_hu + rng.normal(0, 15, thin_hu.shape)  # (D, H, W)
    thick_hu = thin_hu.reshape(n_thick, 5, size, size).mean(axis=1)
    spacing = (0.0, 0.8, 0.8)
    thin = Volume(np.round(thin_hu).astype(np.int16), (1.0, *spacing[1:]), thin_z)
    thick = Volume(np.round(thick_hu).astype(np.int16), (5.0, *spacing[1:]), thick_z)
    return thick, thin


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = CaseStore(tmp_path_factory.mktemp("eval") / "store.zarr")
    store.create()
    for seed, case_id in enumerate(NOISE):
        thick, thin = _blob_case(seed)
        store.write_native(case_id, {"thick": thick, "thin": thin}, "n", {}, 8, 1)
        store.write_case(case_id, {}, "k", {"id": case_id, "status": "ok", "reason": None}, 8, 1)
    return store


def _fake_model(thick: Volume, thin: Volume) -> np.ndarray:
    """The truth plus noise whose size depends on the case (told apart by its thin volume)."""
    case_id = next(c for s, c in enumerate(NOISE) if np.array_equal(thin.hu, _blob_case(s)[1].hu))
    rng = np.random.default_rng(0)
    return np.clip(thin.window(*WINDOW) + rng.normal(0, NOISE[case_id], thin.shape), 0, 1)


@pytest.fixture(scope="module")
def result(store):
    done = []
    predictors = {**baseline_predictors(WINDOW), "model": _fake_model}
    result = evaluate_cases(store, list(NOISE), WINDOW, predictors, progress=done.append)
    assert done == list(NOISE)
    return result


def test_evaluate_cases_scores_every_method_and_case(store, result):
    assert result.methods == ["nearest", "linear", "cubic", "model"] and result.ranked_by == "model"
    thick, thin = store.read("c-mid", "thick"), store.read("c-mid", "thin")
    truth = thin.window(*WINDOW)
    between = in_between_mask(thick.z_mm, thin.z_mm)
    cubic = baseline_predictors(WINDOW)["cubic"](thick, thin)
    assert result.scores["cubic"]["c-mid"]["all"] == pytest.approx(score(cubic, truth, width_hu=WINDOW[1]))
    assert result.scores["cubic"]["c-mid"]["in_between"] == pytest.approx(score(cubic, truth, between, width_hu=WINDOW[1]))
    assert result.n_slices["c-mid"] == {"all": 20, "in_between": 16}
    means = result.means()
    psnrs = [result.scores["linear"][c]["all"]["psnr"] for c in NOISE]
    assert means["linear"]["psnr"] == pytest.approx(np.mean(psnrs))
    assert means["linear"]["psnr_std"] == pytest.approx(np.std(psnrs, ddof=1))
    assert means["model"]["psnr"] > means["cubic"]["psnr"] > means["nearest"]["psnr"]
    assert (result.best.case_id, result.worst.case_id) == ("c-good", "c-bad")
    assert set(result.best.axial) == {"thick", "truth", "cubic", "model"}
    assert result.best.axial["truth"].shape == (32, 32) and result.best.coronal["model"].shape == (20, 32)
    assert result.best.offset_mm == pytest.approx(2.0)  # the axial view is as far from a thick centre as can be


def test_cases_are_ranked_by_cubic_without_a_model(store):
    result = evaluate_cases(store, ["c-good", "c-bad"], WINDOW, baseline_predictors(WINDOW))
    assert result.ranked_by == "cubic" and set(result.best.axial) == {"thick", "truth", "cubic"}


def test_a_prediction_of_the_wrong_shape_names_the_method(store):
    with pytest.raises(ValueError, match="'broken'.*c-good"):
        evaluate_cases(store, ["c-good"], WINDOW, {"broken": lambda thick, thin: thick.window(*WINDOW)})


def test_metrics_json_has_the_spec_shape(result):
    metrics = json.loads(json.dumps(metrics_json(result, WINDOW)))
    assert metrics["window"] == [40.0, 400.0]
    assert set(metrics["methods"]) == {"nearest", "linear", "cubic", "model"}
    for stats in metrics["methods"].values():
        assert isinstance(stats["psnr"], float) and isinstance(stats["ssim"], float)
        assert set(stats["per_case"]) == set(NOISE)
        for case in stats["per_case"].values():
            assert isinstance(case["psnr"], float) and isinstance(case["ssim"], float)
        assert stats["psnr"] == pytest.approx(np.mean([c["psnr"] for c in stats["per_case"].values()]))
        assert set(stats["in_between"]) >= {"psnr", "ssim", "psnr_std", "ssim_std"}


# -- report ----------------------------------------------------------------------------------------


def test_report_writes_metrics_markdown_and_figures(tmp_path, result):
    history = [{"time": f"2024-01-0{i}T00:00:00", "means": {"model": {"psnr": 30.0 + i, "ssim": 0.9},
                                                              "cubic": {"psnr": 29.0, "ssim": 0.85}}} for i in (1, 2)]
    paths = write_report(tmp_path / "run", result, WINDOW, history, "test evaluation", ["a note"])
    assert set(paths) == {"metrics_json", "report_md", "figure_best", "figure_worst", "trend"}
    assert load_metrics(paths["metrics_json"]) == json.loads(json.dumps(metrics_json(result, WINDOW)))
    report = paths["report_md"].read_text()
    assert "# test evaluation" in report and "- a note" in report and "c-bad (worst)" in report
    assert "the model beats every baseline on in-between slices" in report
    assert "![best case](best_case.png)" in report and "![trend](trend.png)" in report
    for name in ("figure_best", "figure_worst", "trend"):
        with Image.open(paths[name]) as image:
            width, height = image.size
            assert width >= 600 and 200 <= height <= width
            assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
    assert not list((tmp_path / "run").glob(".*tmp*"))
    one = write_report(tmp_path / "one", result, WINDOW, history[:1], "t", [])
    assert "trend" not in one


def _texts(ax_or_fig) -> list[str]:
    return [t.get_text() for t in ax_or_fig.findobj(matplotlib.text.Text) if t.get_text()]


def _edge_letters(ax) -> set[str]:
    return {t.get_text() for t in ax.texts}


def test_case_figure_explains_its_lines_and_is_drawn_in_mm_with_orientation(result):
    views = result.best
    fig = case_views_figure(views, "best", "model", WINDOW)
    try:
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        axial, coronal = axes[: len(axes) // 2], axes[len(axes) // 2:]
        dz, dy, dx = views.thin_spacing_mm
        for ax in axial:
            assert _edge_letters(ax) == {"R", "L", "A", "P"} and ax.get_xlabel() == "x (mm)"
            assert ax.get_xlim() == pytest.approx((0, 32 * dx))  # columns span the field in mm
        for ax in coronal:
            assert _edge_letters(ax) == {"R", "L", "S", "I"} and ax.get_xlabel() == "x (mm)"
            z0, z1 = ax.get_ylim()
            assert z1 - z0 == pytest.approx(20 * dz) and z0 < views.z_mm < z1  # superior at the top
            assert ax.get_aspect() == 1.0  # mm on both axes: dz against dx at true scale
        assert axial[0].get_ylabel() == "y (mm)" and coronal[0].get_ylabel() == "z (mm)"
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == [f"axial slice shown above (z = {views.z_mm:.1f} mm)",
                          f"coronal plane shown below (y = {(views.row + 0.5) * dy:.1f} mm)"]
        title = fig.get_suptitle()
        assert f"coronal y = {(views.row + 0.5) * dy:.1f} mm" in title and "row" not in title
        assert sum("error| (HU)" in t for t in _texts(fig)) == 2  # one colour bar per row
    finally:
        matplotlib.pyplot.close(fig)


def test_uncertainty_figure_has_mm_axes_orientation_and_line_legend(result):
    views = dataclasses.replace(result.best, std={"axial": np.full((32, 32), 0.01), "coronal": np.full((20, 32), 0.01)})
    fig = uncertainty_views_figure(views, "model", WINDOW)
    try:
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert [_edge_letters(ax) for ax in axes] == [{"R", "L", "A", "P"}] * 2 + [{"R", "L", "S", "I"}] * 2
        assert [ax.get_ylabel() for ax in axes[::2]] == ["y (mm)", "z (mm)"]
        assert all(ax.get_xlabel() == "x (mm)" for ax in axes)
        assert "axial slice shown above" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    finally:
        matplotlib.pyplot.close(fig)


def test_tables_read_from_the_result_or_metrics_json(result):
    metrics = metrics_json(result, WINDOW)
    rows = table_rows(metrics)
    assert rows == table_rows(result)
    assert [r["method"] for r in rows] == ["nearest", "linear", "cubic", "model"]
    cubic = metrics["methods"]["cubic"]
    assert rows[2]["PSNR (dB)"] == f"{cubic['psnr']:.2f} ± {cubic['psnr_std']:.2f}"
    assert rows[2]["cases"] == "3"
    table = markdown_table(metrics).splitlines()
    assert len(table) == 8 and table[0] == "| method | PSNR (dB) | SSIM | PSNR mid (dB) | SSIM mid | W1 mid (HU) | cases |"
    assert table[-1].startswith("PSNR and SSIM over all thin slices; *mid*: over the in-between slices")
    # One case: the mean alone (a std of 0 over one case says nothing).
    one = {**metrics, "methods": {"cubic": {**cubic, "per_case": dict(list(cubic["per_case"].items())[:1])}}}
    assert table_rows(one)[0]["PSNR (dB)"] == f"{cubic['psnr']:.2f}"


def _stats(psnr: float, ssim: float, between: tuple[float, float]) -> dict:
    per_case = {"c": {"psnr": psnr, "ssim": ssim, "in_between": {"psnr": between[0], "ssim": between[1]}}}
    return {"psnr": psnr, "ssim": ssim, "in_between": {"psnr": between[0], "ssim": between[1]}, "per_case": per_case}


def test_findings_say_when_the_model_does_not_beat_a_baseline():
    metrics = {"window": [40, 400], "n_cases": 8, "methods": {
        "nearest": _stats(30.0, 0.80, (31.0, 0.82)),
        "cubic": _stats(29.0, 0.79, (29.5, 0.80)),
        "model": _stats(32.0, 0.85, (30.5, 0.83)),
        "vae_ceiling": _stats(35.0, 0.95, (35.0, 0.95)),
    }}
    lines = findings(metrics)
    assert "the model does not beat nearest on in-between slices (PSNR 30.50 vs 31.00 dB)" in lines
    assert any(line.startswith("the model beats every baseline on all slices: PSNR +2.00 dB") for line in lines)
    assert "the model beats nearest on 0 of 1 cases (in-between PSNR)" in lines
    assert "the model is 3.00 dB PSNR below the VAE ceiling (all slices)" in lines
    assert not any("only" in line for line in lines)
    assert not any("limits the result" in line for line in lines)

    metrics["methods"]["vae_ceiling"] = _stats(25.0, 0.70, (24.0, 0.69))
    assert ("the VAE ceiling (24.00 dB on in-between slices) is below cubic (29.50 dB): the VAE, not the "
            "diffusion model, is what limits the result; train it longer or adopt pretrained weights "
            "(vae.pretrained)") in findings(metrics)


# -- history ---------------------------------------------------------------------------------------


def test_history_survives_a_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "reports" / "history.jsonl"
    assert read_history(path) == []
    append_history(path, {"n": 1})
    append_history(path, {"n": 2})
    with open(path, "a") as handle:
        handle.write('{"n": 3, "means": {"mod')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING, logger="ctdiff.evaluate"):
        assert read_history(path) == [{"n": 1}, {"n": 2}]
    assert "line 3" in caplog.text
    append_history(path, {"n": 4})
    assert read_history(path) == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert path.read_text().count("\n") == 4
