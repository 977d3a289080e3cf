"""The evaluation report (SPEC §6): metrics.json, report.md, and figures read at a glance.

Tables and findings are built from the `metrics.json` dict (or straight from an
`EvaluationResult`), so a Prefect artifact made later from the file shows the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctdiff.atomic import atomic_path, write_text
from ctdiff.evaluate import MODEL_PREFIX, CaseViews, EvaluationResult, metrics_json
from ctdiff.figures import (
    CORONAL_MAX_WIDTH, axial_extent_mm, central_columns, coronal_extent_mm, pyplot, show_view,
)
from ctdiff.interpolate import METHODS

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: tables and findings need none
    import matplotlib.pyplot as plt

# Short headers keep the table narrow (terminal, Prefect UI); TABLE_KEY spells them out.
_COLUMNS = ("PSNR (dB)", "SSIM", "PSNR mid (dB)", "SSIM mid", "W1 mid (HU)")
TABLE_KEY = (
    "PSNR and SSIM over all thin slices; *mid*: over the in-between slices only (not at a thick-slice "
    "centre); W1: Wasserstein-1 distance between the intensity histograms of prediction and truth "
    "(lower is better); mean ± std over cases (the mean alone for one case)"
)
# Entries that `ctdiff.evaluate.model_predictors` adds beside a model: reported, not argued over.
_VARIANTS = ("_1sample", "_slab", "_no_slab")
_FEW_CASES = 5  # below this, say that the spread across cases is not to be trusted
_DPI = 80
_AXIAL_LINE = "tab:cyan"  # dashed line on coronal views: where the axial slice lies
_CORONAL_LINE = "tab:orange"  # dashed line on axial views: where the coronal plane lies


# -- tables ----------------------------------------------------------------------------------------


def _as_metrics(source: EvaluationResult | dict[str, Any]) -> dict[str, Any]:
    return metrics_json(source) if isinstance(source, EvaluationResult) else source


def _mean_std(stats: dict[str, Any] | None, metric: str, digits: int, n_cases: int) -> str:
    if not stats or stats.get(metric) is None:
        return "–"
    std = stats.get(f"{metric}_std")  # 0 for one case: says nothing, so not shown
    return f"{stats[metric]:.{digits}f}" + ("" if std is None or n_cases < 2 else f" ± {std:.{digits}f}")


def table_rows(source: EvaluationResult | dict[str, Any]) -> list[dict[str, str]]:
    """One row per method: mean ± std over cases of PSNR/SSIM, all and in-between slices, and
    the in-between histogram distance (lower is better)."""
    metrics = _as_metrics(source)
    rows = []
    for method, stats in metrics["methods"].items():
        between, n = stats.get("in_between"), len(stats["per_case"])
        values = (
            _mean_std(stats, "psnr", 2, n), _mean_std(stats, "ssim", 4, n),
            _mean_std(between, "psnr", 2, n), _mean_std(between, "ssim", 4, n),
            _mean_std(between, "hist_w1_hu", 2, n),
        )
        rows.append({"method": method, **dict(zip(_COLUMNS, values)), "cases": str(len(stats["per_case"]))})
    return rows


def markdown_table(source: EvaluationResult | dict[str, Any]) -> str:
    """`table_rows` as a Markdown table, and `TABLE_KEY` below it."""
    rows = table_rows(source)
    header = ["method", *_COLUMNS, "cases"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in rows]
    return "\n".join([*lines, "", TABLE_KEY])


# -- findings --------------------------------------------------------------------------------------


def _region(stats: dict[str, Any], region: str) -> dict[str, Any] | None:
    return stats if region == "all" else stats.get("in_between")


def _label(method: str) -> str:
    return "the model" if method == MODEL_PREFIX else f"`{method}`"


def _is_variant(method: str) -> bool:
    return method.endswith(_VARIANTS)


def findings(source: EvaluationResult | dict[str, Any]) -> list[str]:
    """Statements the numbers support, e.g. "the model does not beat nearest on in-between
    slices (PSNR 30.10 vs 31.20 dB)". "Beats" means a strictly higher mean over cases."""
    metrics = _as_metrics(source)
    methods = metrics["methods"]
    models = [m for m in methods if m.startswith(MODEL_PREFIX) and not _is_variant(m)]
    baselines = [m for m in METHODS if m in methods]
    n_cases = metrics.get("n_cases", max((len(s["per_case"]) for s in methods.values()), default=0))
    out = []
    if n_cases < _FEW_CASES:
        out.append(f"only {n_cases} case(s): the means are noisy and the stds say little")
    if not models:
        out.append("no model was scored; cases are ranked by cubic interpolation")
    for model in models:
        for region, where in (("all", "all slices"), ("in_between", "in-between slices")):
            out += _region_findings(methods, model, baselines, region, where)
        out += _case_wins(methods, model, baselines)
        out += _variant_findings(methods, model)
        ceiling, mine = methods.get("vae_ceiling"), methods[model]
        if ceiling and ceiling.get("psnr") is not None and mine.get("psnr") is not None:
            gap = ceiling["psnr"] - mine["psnr"]
            side = "below" if gap >= 0 else "above"
            out.append(f"{_label(model)} is {abs(gap):.2f} dB PSNR {side} the VAE ceiling (all slices)")
    out += _ceiling_findings(methods, baselines)
    return out


def _variant_findings(methods: dict, model: str) -> list[str]:
    """One sample against the mean of K, slab consistency on against off, and the histogram
    distance against cubic's: the figures blur cannot win."""
    def between(name: str) -> dict:
        return (methods.get(name) or {}).get("in_between") or {}

    mine, out = between(model), []
    single = between(f"{model}_1sample")
    if mine.get("psnr") is not None and single.get("psnr") is not None:
        out.append(
            f"{_label(model)}: the mean of its samples scores {mine['psnr'] - single['psnr']:+.2f} dB in-between PSNR "
            f"over one sample, the single sample's histogram is {single['hist_w1_hu']:.2f} vs the mean's "
            f"{mine['hist_w1_hu']:.2f} HU from the truth (W1, lower is sharper texture)"
        )
    for other, what in ((f"{model}_no_slab", "without"), (f"{model}_slab", "with")):
        theirs = between(other)
        if mine.get("psnr") is not None and theirs.get("psnr") is not None:
            out.append(f"{_label(model)} {what} thick-slab consistency: {theirs['psnr']:.2f} dB in-between PSNR "
                       f"(as configured: {mine['psnr']:.2f} dB)")
    cubic = between("cubic")
    if mine.get("hist_w1_hu") is not None and cubic.get("hist_w1_hu") is not None:
        side = "closer to" if mine["hist_w1_hu"] < cubic["hist_w1_hu"] else "not closer to"
        out.append(f"{_label(model)}'s intensity histogram is {side} the truth's than cubic's "
                   f"(W1 {mine['hist_w1_hu']:.2f} vs {cubic['hist_w1_hu']:.2f} HU, in-between slices)")
    return out


def _ceiling_findings(methods: dict, baselines: list[str]) -> list[str]:
    """Say so when the VAE alone loses to a baseline: then no model on its latents can win."""
    ceiling = (methods.get("vae_ceiling") or {}).get("in_between") or {}
    scored = [b for b in baselines if (methods[b].get("in_between") or {}).get("psnr") is not None]
    if ceiling.get("psnr") is None or not scored:
        return []
    worst = min(scored, key=lambda b: methods[b]["in_between"]["psnr"])
    if ceiling["psnr"] > methods[worst]["in_between"]["psnr"]:
        return []
    return [
        f"the VAE ceiling ({ceiling['psnr']:.2f} dB on in-between slices) is below {worst} "
        f"({methods[worst]['in_between']['psnr']:.2f} dB): the VAE, not the diffusion model, is what "
        "limits the result; train it longer or adopt pretrained weights (vae.pretrained)"
    ]


def _region_findings(methods: dict, model: str, baselines: list[str], region: str, where: str) -> list[str]:
    mine = _region(methods[model], region)
    if not mine or mine.get("psnr") is None:
        return []
    out, beaten_all = [], True
    for base in baselines:
        theirs = _region(methods[base], region)
        if not theirs or theirs.get("psnr") is None:
            continue
        lost = []
        if mine["psnr"] <= theirs["psnr"]:
            lost.append(f"PSNR {mine['psnr']:.2f} vs {theirs['psnr']:.2f} dB")
        if mine["ssim"] <= theirs["ssim"]:
            lost.append(f"SSIM {mine['ssim']:.4f} vs {theirs['ssim']:.4f}")
        if lost:
            beaten_all = False
            out.append(f"{_label(model)} does not beat {base} on {where} ({', '.join(lost)})")
    scored = [
        {**_region(methods[b], region), "name": b}
        for b in baselines if (_region(methods[b], region) or {}).get("psnr") is not None
    ]
    if beaten_all and scored:
        psnr_best = max(scored, key=lambda s: s["psnr"])
        ssim_best = max(scored, key=lambda s: s["ssim"])
        out.append(
            f"{_label(model)} beats every baseline on {where}: PSNR +{mine['psnr'] - psnr_best['psnr']:.2f} dB "
            f"over {psnr_best['name']}, SSIM +{mine['ssim'] - ssim_best['ssim']:.4f} over {ssim_best['name']} "
            "(the best baselines)"
        )
    return out


def _case_wins(methods: dict, model: str, baselines: list[str]) -> list[str]:
    """On how many cases the model beats the best baseline in in-between PSNR: a mean can hide
    one bad case or be carried by one good one."""
    scored = [b for b in baselines if (methods[b].get("in_between") or {}).get("psnr") is not None]
    if not scored:
        return []
    best = max(scored, key=lambda b: methods[b]["in_between"]["psnr"])
    pairs = [
        (methods[model]["per_case"][c].get("in_between"), methods[best]["per_case"][c].get("in_between"))
        for c in methods[model]["per_case"]
    ]
    pairs = [(a["psnr"], b["psnr"]) for a, b in pairs if a and b]
    wins = sum(a > b for a, b in pairs)
    return [f"{_label(model)} beats {best} on {wins} of {len(pairs)} cases (in-between PSNR)"]


# -- figures ---------------------------------------------------------------------------------------


def _savefig(fig: plt.Figure, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=_DPI)
    finally:
        pyplot().close(fig)
    return path


def _cross_lines(views: CaseViews) -> tuple[float, float]:
    """(y_mm, z_mm): where the coronal plane cuts the axial views and the axial slice the coronal."""
    dy = views.thin_spacing_mm[1]
    return (views.row + 0.5) * dy, views.z_mm


def _view_extents(views: CaseViews, columns: slice) -> dict[str, tuple[float, float, float, float]]:
    dz, dy, dx = views.thin_spacing_mm
    depth = views.coronal["truth"].shape[0]
    z_mm = views.z_mm + (np.arange(depth) - views.z_index) * dz  # (D_thin,) thin slice centres
    return {"axial": axial_extent_mm(views.axial["truth"].shape, dy, dx), "coronal": coronal_extent_mm(z_mm, columns, dx)}


def _legend_lines(fig: plt.Figure, views: CaseViews) -> None:
    """Say what the dashed lines are, once, below the panels."""
    from matplotlib.lines import Line2D

    y_mm, z_mm = _cross_lines(views)
    handles = [
        Line2D([], [], color=_AXIAL_LINE, ls="--", lw=1, label=f"axial slice shown above (z = {z_mm:.1f} mm)"),
        Line2D([], [], color=_CORONAL_LINE, ls="--", lw=1, label=f"coronal plane shown below (y = {y_mm:.1f} mm)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def case_views_figure(views: CaseViews, role: str, ranked_by: str, window: tuple[float, float]) -> plt.Figure:
    """Axial (top) and coronal (bottom) views of one case: thick input as its real slabs, truth,
    cubic, the model, and their absolute errors in HU on one shared colour scale per row.
    Images sit on mm axes at true aspect (the coronal row shows the z resolution) with
    orientation letters; a coronal view much wider than deep is cropped to its central part,
    else the slabs are a few pixels. Dashed lines mark where each row's plane cuts the other."""
    center, width = window
    methods = [m for m in views.axial if m not in ("thick", "truth")]  # cubic, then the model
    images = ["thick", "truth", *methods]
    dz, dy, dx = views.thin_spacing_mm
    height, row_width = views.axial["truth"].shape
    depth = views.coronal["truth"].shape[0]
    columns = central_columns(row_width, dx, CORONAL_MAX_WIDTH * depth * dz)
    coronal = {name: image[:, columns] for name, image in views.coronal.items()}  # (D_thin, W') each
    crop_width = columns.stop - columns.start
    extents = _view_extents(views, columns)
    y_mm, z_mm = _cross_lines(views)
    ratios = [height * dy / (row_width * dx), depth * dz / (crop_width * dx)]
    ncols = len(images) + len(methods)
    fig, axes = pyplot().subplots(
        2, ncols, figsize=(2.8 * ncols, 2.8 * sum(ratios) + 1.6), squeeze=False,
        gridspec_kw={"height_ratios": ratios}, layout="constrained",
    )
    titles = {"thick": f"thick input ({views.thick_mm:g} mm)", "truth": f"truth ({dz:g} mm)"}
    for r, (plane, cut) in enumerate((("axial", views.axial), ("coronal", coronal))):
        for c, name in enumerate(images):
            ax = axes[r, c]
            show_view(ax, cut[name], plane, extents[plane])
            ax.set_title(f"{titles.get(name, name)}, {plane}", fontsize=9)
            if plane == "coronal":
                ax.axhline(z_mm, color=_AXIAL_LINE, lw=0.8, ls="--")
            else:
                ax.axhline(y_mm, color=_CORONAL_LINE, lw=0.8, ls="--")
        axes[r, 0].set_ylabel("y (mm)" if plane == "axial" else "z (mm)", fontsize=8)
        for ax in axes[r]:
            ax.set_xlabel("x (mm)", fontsize=8)
        if not methods:
            continue
        errors_hu = [np.abs(cut[m] - cut["truth"]) * width for m in methods]
        vmax = max(float(np.percentile(np.concatenate([e.ravel() for e in errors_hu]), 99.5)), 1.0)
        error_axes = list(axes[r, len(images):])
        for ax, method, error in zip(error_axes, methods, errors_hu):
            im = show_view(ax, error, plane, extents[plane], cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(f"|{method} − truth|, {plane}", fontsize=9)
        fig.colorbar(im, ax=error_axes, label="|error| (HU)", shrink=0.9)
    _legend_lines(fig, views)
    fig.suptitle(
        f"{role} case {views.case_id}: {ranked_by} PSNR {views.psnr:.2f} dB · axial z = {views.z_mm:.1f} mm "
        f"({views.offset_mm:.1f} mm from a thick centre) · coronal y = {y_mm:.1f} mm"
        + (f", central {crop_width * dx:.0f} mm" if crop_width < row_width else "")
        + f" · window {center:g}/{width:g} HU",
        fontsize=10,
    )
    return fig


def case_figure(views: CaseViews, role: str, ranked_by: str, window: tuple[float, float], path: Path) -> Path:
    """`case_views_figure`, written atomically to `path`."""
    return _savefig(case_views_figure(views, role, ranked_by, window), path)


def uncertainty_views_figure(views: CaseViews, ranked_by: str, window: tuple[float, float]) -> plt.Figure:
    """The model's per-voxel sample std (HU) beside its absolute error (HU), axial and coronal,
    for one case, on mm axes at true aspect: where the samples disagree should be where the
    errors are."""
    width = window[1]
    dz, dy, dx = views.thin_spacing_mm
    height, row_width = views.axial["truth"].shape
    depth = views.coronal["truth"].shape[0]
    columns = central_columns(row_width, dx, CORONAL_MAX_WIDTH * depth * dz)
    extents = _view_extents(views, columns)
    y_mm, z_mm = _cross_lines(views)
    panels = [
        ("axial", views.std["axial"], np.abs(views.axial[ranked_by] - views.axial["truth"])),
        ("coronal", views.std["coronal"][:, columns],
         np.abs(views.coronal[ranked_by] - views.coronal["truth"])[:, columns]),
    ]
    ratios = [height * dy / (row_width * dx), depth * dz / ((columns.stop - columns.start) * dx)]
    fig, axes = pyplot().subplots(2, 2, figsize=(8.0, 3.4 * sum(ratios) + 1.8), gridspec_kw={"height_ratios": ratios},
                             layout="constrained")
    vmax = max(float(np.percentile(np.concatenate([p[2].ravel() for p in panels]) * width, 99.5)), 1.0)
    for r, (plane, std, error) in enumerate(panels):
        for c, (image, title) in enumerate(((std, f"sample std, {plane}"), (error, f"|{ranked_by} − truth|, {plane}"))):
            ax = axes[r, c]
            im = show_view(ax, image * width, plane, extents[plane], cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x (mm)", fontsize=8)
            if plane == "coronal":
                ax.axhline(z_mm, color=_AXIAL_LINE, lw=0.8, ls="--")
            else:
                ax.axhline(y_mm, color=_CORONAL_LINE, lw=0.8, ls="--")
        axes[r, 0].set_ylabel("y (mm)" if plane == "axial" else "z (mm)", fontsize=8)
    fig.colorbar(im, ax=list(axes.ravel()), label="HU", shrink=0.8)
    _legend_lines(fig, views)
    fig.suptitle(f"uncertainty of {ranked_by}, case {views.case_id} (axial z = {views.z_mm:.1f} mm, "
                 f"coronal y = {y_mm:.1f} mm)", fontsize=10)
    return fig


def uncertainty_figure(views: CaseViews, ranked_by: str, window: tuple[float, float], path: Path) -> Path:
    """`uncertainty_views_figure`, written atomically to `path`."""
    return _savefig(uncertainty_views_figure(views, ranked_by, window), path)


def trend_figure(history: list[dict[str, Any]], path: Path) -> Path:
    """PSNR and SSIM means of the model and cubic (bold; other baselines faint) per evaluation."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    x = np.arange(1, len(history) + 1)
    names = [MODEL_PREFIX, "cubic", "linear", "nearest", "vae_ceiling"]
    for ax, metric, unit in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for i, name in enumerate(names):
            for key, style in (("means", "-"), ("in_between_means", "--")):
                values = [((r.get(key) or {}).get(name) or {}).get(metric) for r in history]
                if all(v is None for v in values):
                    continue
                y = np.array([np.nan if v is None else v for v in values], dtype=float)
                strong = name in (MODEL_PREFIX, "cubic")
                label = name + (" (in-between)" if key == "in_between_means" else "")
                ax.plot(x, y, style, marker="o", color=f"C{i}", lw=2 if strong else 0.8,
                        alpha=1.0 if strong else 0.5, label=label)
        labels = [str(r.get("time", i))[:16].replace("T", " ") for i, r in zip(x, history)]
        ax.set_xticks(x, labels, rotation=30, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_xlabel("evaluation")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("evaluations over time (mean over cases)")
    return _savefig(fig, path)


# -- the report ------------------------------------------------------------------------------------


def _case_table(metrics: dict[str, Any], result: EvaluationResult) -> str:
    methods = [m for m in metrics["methods"] if not _is_variant(m)]  # the variants stay in metrics.json
    header = ["case", "thin slices", "in-between", *(f"{m} PSNR / SSIM" for m in methods)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    tags = {result.best.case_id: " (best)", result.worst.case_id: " (worst)"} if result.best else {}
    if result.best and result.best.case_id == result.worst.case_id:
        tags = {result.best.case_id: " (best = worst)"}
    for case_id in result.case_ids:
        cells = [f"{case_id}{tags.get(case_id, '')}", str(result.n_slices[case_id]["all"]),
                 str(result.n_slices[case_id]["in_between"])]
        for m in methods:
            s = metrics["methods"][m]["per_case"][case_id]
            cells.append(f"{s['psnr']:.2f} / {s['ssim']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path, result: EvaluationResult, window: tuple[float, float], history: list[dict[str, Any]],
    title: str, notes: list[str],
) -> dict[str, Path]:
    """Write metrics.json, report.md, the best/worst case figures and (with >= 2 evaluations in
    `history`) the trend plot under `out_dir`; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = metrics_json(result, window)
    paths = {"metrics_json": write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")}
    figures = []
    if result.best is not None:
        cases = [("best", result.best)]
        if result.worst.case_id != result.best.case_id:
            cases.append(("worst", result.worst))
        for role, views in cases:
            path = case_figure(views, role, result.ranked_by, window, out_dir / f"{role}_case.png")
            paths[f"figure_{role}"] = path
            figures.append(f"### {role.capitalize()} case: {views.case_id}\n\n![{role} case]({path.name})")
        if result.best.std:
            path = uncertainty_figure(result.best, result.ranked_by, window, out_dir / "uncertainty.png")
            paths["figure_uncertainty"] = path
            figures.append(
                f"### Uncertainty: {result.best.case_id}\n\nPer-voxel standard deviation of the model's samples "
                f"(HU) beside its error.\n\n![uncertainty]({path.name})"
            )
    if len(history) >= 2:
        paths["trend"] = trend_figure(history, out_dir / "trend.png")
    center, width = window
    sections = [
        f"# {title}",
        f"{len(result.case_ids)} case(s), window {center:g}/{width:g} HU. PSNR and SSIM are computed on the "
        "windowed thin volume scaled to [0, 1] (data range 1) over all thin slices the thick series covers, "
        "and over the in-between slices only (thin slices not at a thick slice centre). PSNR is over the "
        "selected slices together; SSIM is 2-D per axial slice, averaged. Mean ± sample std over cases. "
        "Baselines interpolate the windowed thick slices. The histogram distance is the Wasserstein-1 "
        "distance between the intensity histograms of prediction and truth over the body voxels (HU; "
        "lower is better; blur does not win it). `vae_ceiling` is the best output the model's VAE allows "
        "under its formulation (for residual models: base + decoded true residual).",
        "## Methods\n\n" + markdown_table(metrics),
        "## Findings\n\n" + "\n".join(f"- {line}" for line in findings(metrics)),
    ]
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {line}" for line in notes))
    sections.append(f"## Cases (ranked by {result.ranked_by} PSNR)\n\n" + _case_table(metrics, result))
    if figures:
        sections.append("## Figures\n\n" + "\n\n".join(figures))
    sections.append(
        "## Trend\n\n" + ("![trend](trend.png)" if "trend" in paths else
                          f"{len(history)} evaluation(s) in the history; the trend plot needs 2.")
    )
    paths["report_md"] = write_text(out_dir / "report.md", "\n\n".join(sections) + "\n")
    return paths
