"""Scoring thin-slice predictors on cases of the store: the numbers behind SPEC §6.

A predictor maps a case's (thick, thin) volumes to a windowed prediction in [0, 1] at the thin
positions. It is handed the true thin volume only so that the VAE ceiling can encode it and a
model can read `thin.z_mm`; the baselines and the model look at the thick volume alone.

The classical baselines window the thick HU first and interpolate the windowed slices, then
clip to [0, 1] (cubic overshoots): the same input and order a model sees, so the comparison is
between methods and not between pre-processings.

A predictor returns the prediction, or (prediction, std) when it samples: the per-voxel std of
its samples, kept for the report's uncertainty figure. `model_predictors` turns one diffusion
model into several entries (K-sample mean, one sample, the other slab-consistency setting, the
VAE ceiling) that share one set of K draws per case.

Every case is scored over all its thin slices (the store crops them to the z-range the thick
series covers) and over the in-between slices only (`ctdiff.metrics.in_between_mask`). Volumes
are dropped after each case; only 2-D views of the best and the worst case (by the model's
PSNR, else cubic's) are kept, for the report's figures.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ctdiff.interpolate import METHODS, Method, interpolate_z
from ctdiff.metrics import Device, in_between_mask, score_regions
from ctdiff.store import CaseStore
from ctdiff.volume import Volume

# (thick, thin) -> (D_thin, H, W) float in [0, 1], or that and its per-voxel std
Predictor = Callable[[Volume, Volume], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
Scores = dict[str, float]  # {"psnr": dB, "ssim": 0..1, "hist_w1_hu": HU}
METRICS = ("psnr", "ssim", "hist_w1_hu")
REGIONS = ("all", "in_between")
MODEL_PREFIX = "model"  # SPEC §6 method name; checkpoints beyond the first are "model@..."
FALLBACK_RANKING = "cubic"  # the best classical baseline ranks cases when no model is scored

log = logging.getLogger(__name__)


def interpolation_prediction(thick: Volume, thin: Volume, *, method: Method, window: tuple[float, float]) -> np.ndarray:
    """Window the thick HU, interpolate the windowed slices to `thin.z_mm`, clip to [0, 1]."""
    pred = interpolate_z(thick.window(*window), thick.z_mm, thin.z_mm, method)  # (D_thin, H, W)
    return np.clip(pred, 0.0, 1.0, out=pred)


def baseline_predictors(window: tuple[float, float]) -> dict[str, Predictor]:
    """{"nearest", "linear", "cubic"}: classical z-interpolation of the windowed thick volume."""
    center, width = (float(v) for v in window)
    return {m: partial(interpolation_prediction, method=m, window=(center, width)) for m in METHODS}


@dataclass(frozen=True)
class CaseViews:
    """The 2-D images of one case that the figures show; the volumes themselves are not kept.

    `axial` holds (H, W) slices at `z_mm` and `coronal` (D_thin, W) images at row `row`, both
    windowed [0, 1], keyed "thick" (nearest-expanded onto the thin grid: the real slabs),
    "truth" and the method names the figures need; `std` the same views of the ranking
    method's per-voxel sample std (windowed units), when it samples.
    """

    case_id: str
    psnr: float  # of the ranking method, all slices
    z_mm: float
    z_index: int
    offset_mm: float  # distance of the axial slice from the nearest thick centre
    row: int
    thin_spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    thick_mm: float
    axial: dict[str, np.ndarray]
    coronal: dict[str, np.ndarray]
    std: dict[str, np.ndarray] = field(default_factory=dict)  # {"axial", "coronal"}


@dataclass
class EvaluationResult:
    """Scores of every method on every case; `scores[method][case][region]` is {"psnr", "ssim"}
    (region "all" or "in_between"; None where a case has no in-between slice)."""

    window: tuple[float, float]
    methods: list[str]
    case_ids: list[str]
    ranked_by: str
    scores: dict[str, dict[str, dict[str, Scores | None]]] = field(default_factory=dict)
    n_slices: dict[str, dict[str, int]] = field(default_factory=dict)  # case -> {"all", "in_between"}
    best: CaseViews | None = None
    worst: CaseViews | None = None

    def means(self, region: str = "all") -> dict[str, dict[str, float | None]]:
        """Per method: mean and std over cases of PSNR and SSIM, and the number of cases.

        The std is the sample std (ddof 1) across cases, 0 for a single case; cases without
        slices in the region are left out (all of them: None).
        """
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}; use one of {', '.join(REGIONS)}")
        out = {}
        for method in self.methods:
            rows = [self.scores[method][c][region] for c in self.case_ids]
            rows = [r for r in rows if r is not None]
            stats: dict[str, float | None] = {"n_cases": len(rows)}
            for metric in METRICS:
                values = np.array([r[metric] for r in rows if metric in r], dtype=np.float64)
                stats[metric] = float(values.mean()) if values.size else None
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                stats[f"{metric}_std"] = std if values.size else None
            out[method] = stats
        return out


def ranking_method(methods: list[str]) -> str:
    """The method that ranks cases: "model", else the first "model...", else cubic, else the first."""
    if MODEL_PREFIX in methods:
        return MODEL_PREFIX
    models = [m for m in methods if m.startswith(MODEL_PREFIX)]
    if models:
        return models[0]
    return FALLBACK_RANKING if FALLBACK_RANKING in methods else methods[0]


def evaluate_cases(
    store: CaseStore,
    case_ids: list[str],
    window: tuple[float, float],
    predictors: dict[str, Predictor],
    progress: Callable[[str], None] | None = None,
    device: Device = None,
) -> EvaluationResult:
    """Score every predictor on every case (see the module docstring); `progress(case_id)` after
    each. `device` computes the metrics (None: CUDA when available)."""
    if not case_ids:
        raise ValueError("no cases to evaluate")
    if not predictors:
        raise ValueError("no predictors to evaluate")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique: a case scored twice would count twice in the means")
    window = (float(window[0]), float(window[1]))
    methods = list(predictors)
    ranked_by = ranking_method(methods)
    shown = [m for m in ("cubic", ranked_by) if m in predictors]
    shown = list(dict.fromkeys(shown))  # cubic and the model, once each
    result = EvaluationResult(window, methods, list(case_ids), ranked_by, {m: {} for m in methods})
    for case_id in case_ids:
        thick, thin = store.read(case_id, "thick"), store.read(case_id, "thin")
        truth = thin.window(*window)  # (D_thin, H, W) in [0, 1]
        between = in_between_mask(thick.z_mm, thin.z_mm)
        result.n_slices[case_id] = {"all": int(truth.shape[0]), "in_between": int(between.sum())}
        kept: dict[str, np.ndarray] = {}
        std = None
        for method, predict in predictors.items():
            output = predict(thick, thin)
            pred, pred_std = output if isinstance(output, tuple) else (output, None)
            pred = _checked(pred, truth.shape, method, case_id)
            regions = {"all": None, "in_between": between} if between.any() else {"all": None}
            result.scores[method][case_id] = {
                "in_between": None, **score_regions(pred, truth, regions, device, width_hu=window[1])
            }
            if method in shown:
                kept[method] = pred  # at most two predictions held until the views are cut
            if method == ranked_by and pred_std is not None:
                std = _checked(pred_std, truth.shape, f"{method} std", case_id)
        rank_psnr = result.scores[ranked_by][case_id]["all"]["psnr"]
        views = _case_views(case_id, thick, thin, truth, kept, rank_psnr, window, std)
        del kept, truth
        if result.best is None or views.psnr > result.best.psnr:
            result.best = views
        if result.worst is None or views.psnr < result.worst.psnr:
            result.worst = views
        if progress is not None:
            progress(case_id)
    return result


def _checked(pred: np.ndarray, shape: tuple[int, ...], method: str, case_id: str) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.shape != shape:
        raise ValueError(f"method {method!r} predicted {pred.shape} for case {case_id!r}; the thin volume is {shape}")
    if not np.all(np.isfinite(pred)):
        raise ValueError(f"method {method!r} predicted non-finite values for case {case_id!r}")
    return pred.astype(np.float32, copy=False)


def _case_views(
    case_id: str, thick: Volume, thin: Volume, truth: np.ndarray, preds: dict[str, np.ndarray],
    psnr: float, window: tuple[float, float], std: np.ndarray | None = None,
) -> CaseViews:
    """Cut the figure's views: the axial slice farthest from a thick centre (nearest the middle on
    ties), where interpolation has the most to invent, and the middle coronal row."""
    offsets_mm = np.min(np.abs(thin.z_mm[:, None] - thick.z_mm[None, :]), axis=1)  # (D_thin,)
    middle = (len(thin.z_mm) - 1) / 2
    z_index = int(np.lexsort((np.abs(np.arange(len(thin.z_mm)) - middle), -np.round(offsets_mm, 3)))[0])
    row = truth.shape[1] // 2
    slabs = interpolation_prediction(thick, thin, method="nearest", window=window)  # (D_thin, H, W)
    images = {"thick": slabs, "truth": truth, **preds}
    return CaseViews(
        case_id=case_id, psnr=float(psnr), z_mm=float(thin.z_mm[z_index]), z_index=z_index,
        offset_mm=float(offsets_mm[z_index]), row=row,
        thin_spacing_mm=tuple(float(s) for s in thin.spacing_mm), thick_mm=float(thick.spacing_mm[0]),
        axial={k: v[z_index].copy() for k, v in images.items()},
        coronal={k: v[:, row, :].copy() for k, v in images.items()},
        std={} if std is None else {"axial": std[z_index].copy(), "coronal": std[:, row, :].copy()},
    )


# -- a diffusion model's entries ----------------------------------------------------------------


class _Draws:
    """The K samples of the case being scored, drawn once and shared by a model's entries
    (evaluate_cases hands every predictor the same thick volume object per case)."""

    def __init__(self, model, window: tuple[float, float], seed: int, samples: int):
        self.model, self.window, self.seeds = model, window, list(range(seed, seed + samples))
        self._thick: Volume | None = None
        self._samples: np.ndarray | None = None

    def __call__(self, thick: Volume, thin: Volume) -> np.ndarray:
        if thick is not self._thick:
            self._samples = None  # drop the last case's samples before drawing the next
            self._samples = self.model.draw(thick.window(*self.window), thick.z_mm, thin.z_mm, self.seeds)
            self._thick = thick
        return self._samples  # (K, D_thin, H, W)


def model_predictors(model, name: str, window: tuple[float, float], seed: int, samples: int) -> dict[str, Predictor]:
    """A `ctdiff.thin_slice.ThinSliceModel`'s entries, from one set of K = `samples` draws per case:

    - `name`: the mean of the K samples with the model's slab setting (what `ctdiff infer`
      writes with the same settings), with their std;
    - `name`_1sample: the first sample alone (PSNR rewards the mean, the histogram the sample);
    - `name`_slab or `name`_no_slab: the mean with the other slab-consistency setting.
    """
    draws = _Draws(model, window, seed, samples)
    slab = bool(model.slab_consistency)

    def entry(first_only: bool, slab_consistency: bool) -> Predictor:
        def predict(thick: Volume, thin: Volume):
            drawn = draws(thick, thin)
            chosen = drawn[:1] if first_only else drawn
            return model.finish(chosen, thick.window(*window), thick.z_mm, thin.z_mm, slab_consistency)

        return predict

    return {
        name: entry(False, slab),
        f"{name}_1sample": entry(True, slab),
        f"{name}_{'no_slab' if slab else 'slab'}": entry(False, not slab),
    }


def ceiling_predictor(model, window: tuple[float, float]) -> Predictor:
    """The VAE ceiling of a model's formulation (`ThinSliceModel.ceiling`): the best its VAE allows."""

    def predict(thick: Volume, thin: Volume) -> np.ndarray:
        return model.ceiling(thin.window(*window), thick.window(*window), thick.z_mm, thin.z_mm)

    return predict


# -- metrics.json and the history ----------------------------------------------------------------


def metrics_json(result: EvaluationResult, window: tuple[float, float] | None = None) -> dict[str, Any]:
    """SPEC §6 `metrics.json`: window, and per method the mean PSNR/SSIM over cases (all thin
    slices) with per-case numbers; added: stds, in-between numbers, case counts, the ranking."""
    window = result.window if window is None else window
    means = result.means("all")
    between = result.means("in_between")
    methods = {}
    for method in result.methods:
        per_case = {}
        for case_id in result.case_ids:
            scores = result.scores[method][case_id]
            per_case[case_id] = {**scores["all"], "in_between": scores["in_between"]}
        methods[method] = {
            "psnr": means[method]["psnr"], "ssim": means[method]["ssim"],
            "psnr_std": means[method]["psnr_std"], "ssim_std": means[method]["ssim_std"],
            "hist_w1_hu": means[method]["hist_w1_hu"], "hist_w1_hu_std": means[method]["hist_w1_hu_std"],
            "in_between": between[method],
            "per_case": per_case,
        }
    return {
        "window": [float(window[0]), float(window[1])],
        "methods": methods,
        "n_cases": len(result.case_ids),
        "ranked_by": result.ranked_by,
        "best_case": result.best.case_id if result.best else None,
        "worst_case": result.worst.case_id if result.worst else None,
        "slices": result.n_slices,
    }


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A `metrics.json` written by `ctdiff.report.write_report`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def history_record(
    result: EvaluationResult, *, checkpoint: str | None, checkpoint_digest: str | None, split: str | None,
    time_iso: str, **extra: Any,
) -> dict[str, Any]:
    """One line of reports/history.jsonl: what was scored and the method means (all, in-between)."""
    return {
        "time": time_iso, "checkpoint": checkpoint, "checkpoint_digest": checkpoint_digest, "split": split,
        "n_cases": len(result.case_ids), **extra,
        "means": {m: {k: s[k] for k in METRICS} for m, s in result.means("all").items()},
        "in_between_means": {m: {k: s[k] for k in METRICS} for m, s in result.means("in_between").items()},
    }


def append_history(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line. A last line left unterminated by a killed writer is closed first,
    so it stays one (skipped) bad line instead of corrupting this record too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    line = "\n" + line
        handle.write(line.encode("utf-8"))  # one write: a crash cuts at most this line
        handle.flush()
        os.fsync(handle.fileno())


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a history file in order; a line that is not a JSON object (a write cut
    short by a crash) is skipped with a warning. A missing file is an empty history."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            log.warning("%s line %d is not valid JSON (%s); skipped", path, number, error)
            continue
        if not isinstance(record, dict):
            log.warning("%s line %d is not a JSON object; skipped", path, number)
            continue
        records.append(record)
    return records
