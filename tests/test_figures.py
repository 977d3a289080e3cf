import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from ctdiff.figures import case_preview, preview_figure
from ctdiff.plots import plot_training_curves, training_curves_figure
from ctdiff.store import CaseStore
from ctdiff.volume import Volume


def _case():
    z = np.arange(20.0)
    thin = Volume(hu=np.full((20, 16, 16), -1000, np.int16), spacing_mm=(1.0, 2.0, 2.0), z_mm=z)
    thick = Volume(hu=np.full((4, 16, 16), 40, np.int16), spacing_mm=(5.0, 2.0, 2.0), z_mm=z[2::5])
    return thick, thin


def test_preview_is_drawn_once_per_case_and_window(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    thick, thin = _case()
    store.write_native("c", {"thick": thick, "thin": thin}, "n", {}, 4, 1)
    store.write_case("c", {}, "k", {"id": "c", "status": "ok", "reason": None}, 4, 1)
    out = tmp_path / "previews" / "c.png"
    case_preview(store, "c", 40, 400, out)
    first = out.stat().st_mtime_ns
    with Image.open(out) as image:
        assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
    case_preview(store, "c", 40, 400, out)
    assert out.stat().st_mtime_ns == first  # same case and window: kept
    case_preview(store, "c", -600, 1500, out)
    assert out.stat().st_mtime_ns != first  # a new window is a new picture


def test_preview_is_a_2x2_grid_in_mm_with_orientation_and_no_overlapping_titles():
    thick, thin = _case()
    fig = preview_figure(thick, thin, "c", 40, 400)
    try:
        fig.canvas.draw()
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["thick, axial", "thin, axial", "thick, coronal", "thin, coronal"]
        assert [{t.get_text() for t in ax.texts} for ax in axes] == [{"R", "L", "A", "P"}] * 2 + [{"R", "L", "S", "I"}] * 2
        assert [ax.get_ylabel() for ax in axes] == ["y (mm)"] * 2 + ["z (mm)"] * 2
        assert all(ax.get_xlabel() == "x (mm)" for ax in axes)
        assert axes[0].get_xlim() == pytest.approx((0, 32)) and axes[0].get_ylim() == pytest.approx((32, 0))
        assert axes[3].get_ylim() == pytest.approx((-0.5, 19.5))  # thin slices' z in mm, superior up
        assert all(ax.get_aspect() == 1.0 for ax in axes)  # dz against dx at true scale
        renderer = fig.canvas.get_renderer()
        suptitle = next(t for t in fig.texts if t.get_text() == fig.get_suptitle()).get_window_extent(renderer)
        for ax in axes[:2]:
            assert not suptitle.overlaps(ax.title.get_window_extent(renderer))
        # the coronal row is drawn about as tall as its content, not a strip in a mostly white canvas
        top, bottom = (ax.get_window_extent(renderer) for ax in (axes[0], axes[2]))
        assert bottom.height > 0.4 * top.height
    finally:
        plt.close(fig)


def test_training_curves_put_psnr_and_ssim_in_their_own_labelled_panels(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "val_psnr": None, "val_ssim": None} for s in range(1, 20)]
    history += [{"step": 20, "loss": 0.05, "val_psnr": 30.0, "val_ssim": 0.95},
                {"step": 40, "loss": 0.04, "val_psnr": 31.0, "val_ssim": 0.96}]
    fig = training_curves_figure(history, "t")
    try:
        loss, psnr, ssim = fig.axes
        assert [t.get_text() for t in psnr.get_legend().get_texts()] == ["val PSNR (dB)"]
        assert psnr.get_ylabel() == "val PSNR (dB)"
        assert [t.get_text() for t in ssim.get_legend().get_texts()][0].startswith("val SSIM")
        assert list(psnr.lines[0].get_ydata()) == [30.0, 31.0] and list(ssim.lines[0].get_ydata()) == [0.95, 0.96]
    finally:
        plt.close(fig)
    assert plot_training_curves(history, tmp_path / "loss.png").is_file()
