"""Inference on one case or a folder of cases: thick CT in, thin CT out, full HU range kept.

The model only sees (and predicts) the intensity window; outside it, the thin volume takes the
cubic interpolation of the thick HU, so air, lung and bone keep their values. A predictor is any
callable with the `Predictor` signature, so the flow can pass the diffusion sampler and tests a
plain interpolation. A predictor that averages several samples also returns their standard
deviation (`Prediction`); it is written beside the output as an uncertainty map in HU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ctdiff.cases import UNCATEGORIZED, CaseRef, _case_id, check_unique_ids
from ctdiff.dicom import AIR_HU
from ctdiff.dicom_write import shared_template
from ctdiff.errors import CaseError
from ctdiff.infer_io import (
    STD_SERIES,
    OutputFormat,
    check_output,
    read_thick,
    remove_output,
    std_output_path,
    write_output,
)
from ctdiff.interpolate import interpolate_z, thin_positions
from ctdiff.nifti import directions, is_nifti_path
from ctdiff.preprocess import resize_inplane
from ctdiff.volume import Volume
from ctdiff.windowing import invert_window


class Prediction(NamedTuple):
    """What a predictor returns, checked (`as_prediction`). A predictor may return this, the
    tuple (mean, std), or the mean array alone (one sample, or a deterministic interpolation)."""

    mean: np.ndarray  # (N, H, W) float32 in [0, 1]: the windowed thin volume (mean of the samples)
    # (N, H, W) float32 >= 0: per-voxel std of the samples in windowed units (a fraction of the
    # window width); None when there is nothing to measure it from.
    std: np.ndarray | None


# (thick windowed (D, H, W) float32 in [0, 1], thick z_mm (D,), thin z_mm (N,))
#   -> thin windowed (N, H, W) float32 in [0, 1], or (mean, std) as in `Prediction`
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]
# Called with {"stage": "read" | "predict" | "write", ...} by infer_case and with
# {"done", "total", "id", "status"} after each case by infer_batch.
Progress = Callable[[dict], None]

# Model and cubic HU are blended over this fraction of the window width inside each window edge
# (smoothstep weight on the cubic HU), so no seam shows where the window ends and the model's
# output, saturated at the edges, never decides there.
EDGE_BAND = 0.1
_MERGE_SLICES = 16  # slices merged at once: bounds the float32 temporaries
_INT16_MAX = np.iinfo(np.int16).max


def model_weight(cubic_hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """The model's share of each output voxel in `merge_hu`, float32 in [0, 1] (same shape).

    smoothstep(t), t = (distance of the cubic HU inside the nearer window edge) / (EDGE_BAND ×
    width), clipped to [0, 1]: 1 well inside the window, 0 outside it.
    """
    lower_hu, upper_hu = center_hu - width_hu / 2, center_hu + width_hu / 2
    cubic = cubic_hu.astype(np.float32, copy=False)
    t = np.clip(np.minimum(cubic - lower_hu, upper_hu - cubic) / (EDGE_BAND * width_hu), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def merge_hu(pred: np.ndarray, cubic_hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """int16 HU: the model's (pred × width + lower) well inside the window, the cubic HU outside,
    blended by `model_weight`. Values below air are clipped to air, as the readers do (cubic
    splines overshoot at sharp edges).
    """
    if pred.shape != cubic_hu.shape:
        raise ValueError(f"prediction {pred.shape} and cubic {cubic_hu.shape} differ in shape")
    out = np.empty(pred.shape, dtype=np.int16)
    for block in _blocks(pred.shape[0]):
        model = invert_window(pred[block], center_hu, width_hu)  # (n, H, W)
        cubic = cubic_hu[block].astype(np.float32, copy=False)  # (n, H, W)
        hu = cubic + model_weight(cubic, center_hu, width_hu) * (model - cubic)
        out[block] = np.clip(np.rint(hu), AIR_HU, _INT16_MAX)
    return out


def uncertainty_hu(std: np.ndarray, cubic_hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """int16 HU, rounded: the std of each `merge_hu` output voxel over the model's samples.

    The output is cubic + weight × (model − cubic) with a weight that depends on the cubic HU
    only, so its std is weight × the model's std in HU (std × width_hu): std × width_hu well
    inside the window, 0 where the output is the cubic HU.
    """
    if std.shape != cubic_hu.shape:
        raise ValueError(f"std {std.shape} and cubic {cubic_hu.shape} differ in shape")
    out = np.empty(std.shape, dtype=np.int16)
    for block in _blocks(std.shape[0]):
        weight = model_weight(cubic_hu[block], center_hu, width_hu)  # (n, H, W)
        std_hu = std[block].astype(np.float32, copy=False) * np.float32(width_hu) * weight
        out[block] = np.clip(np.rint(std_hu), 0, _INT16_MAX)
    return out


def _blocks(n_slices: int) -> Iterator[slice]:
    """Slices of at most _MERGE_SLICES along the first axis: bounds the float32 temporaries."""
    for start in range(0, n_slices, _MERGE_SLICES):
        yield slice(start, start + _MERGE_SLICES)


def infer_case(
    input_path: str | Path,
    output_path: str | Path,
    predictor: Predictor,
    window: tuple[float, float],
    thin_mm: float,
    progress: Progress | None = None,
    resolution: int | None = None,
) -> dict:
    """Thin volume from the thick one at `input_path`, written to `output_path`.

    `window` is (center_hu, width_hu); `resolution` the in-plane size the model was trained at
    (its `preprocess.resolution`): the input is resized to it as preprocessing resized the
    training cases (`ctdiff.preprocess.resize_inplane`, same field of view), so the output has
    that many pixels; None keeps the input's grid. The output has `thin_mm` spacing over the thick slabs'
    extent (`thin_positions`), the input's orientation, and its origin at the first thin slice.
    When the predictor returns a std (`Prediction`), its map in HU (`uncertainty_hu`, int16
    rounded) is written with the output's exact geometry at `std_output_path(output_path)`:
    X_std.nii.gz, or a second derived DICOM series in the folder X_std/. A map left there by an
    earlier run is removed either way, so a map beside an output always belongs to it.
    Returns a summary free of patient data ("std_output": the map's path or None). A bad input
    raises `CaseError`; bad settings or a predictor output of the wrong shape or with a bad std
    raise `ValueError`.
    """
    started = time.perf_counter()
    center_hu, width_hu = _check_window(window)
    if not thin_mm > 0:
        raise ValueError(f"thin_mm must be positive, got {thin_mm}")
    fmt = check_output(output_path)  # before any work: a bad output path fails fast
    report = progress or (lambda info: None)

    report({"stage": "read"})
    thick = read_thick(input_path)
    volume = resize_inplane(thick.volume, resolution)
    thick_mm = volume.spacing_mm[0]
    if thin_mm >= thick_mm:
        raise CaseError(f"input slices ({thick_mm:.2f} mm) are not thicker than {thin_mm:g} mm")
    thin_z = thin_positions(volume.z_mm, thick_mm, thin_mm)  # (N,)

    report({"stage": "predict", "n_thick": volume.shape[0], "n_thin": thin_z.size})
    pred = _predict(predictor, volume, thin_z, center_hu, width_hu)
    cubic_hu = interpolate_z(volume.hu, volume.z_mm, thin_z, "cubic")  # (N, H, W)
    hu = merge_hu(pred.mean, cubic_hu, center_hu, width_hu)  # (N, H, W)
    std_hu = None if pred.std is None else uncertainty_hu(pred.std, cubic_hu, center_hu, width_hu)
    del pred, cubic_hu

    _, _, normal = directions(volume.orientation)
    origin = np.asarray(volume.origin_mm) + normal * (thin_z[0] - volume.z_mm[0])
    thin = Volume(
        hu=hu,
        spacing_mm=(float(thin_mm), *volume.spacing_mm[1:]),
        z_mm=thin_z,
        orientation=volume.orientation,
        origin_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
    )
    report({"stage": "write"})
    # The thin and std series in one study and frame of reference, also from a NIfTI input.
    template = shared_template(thick.template) if fmt == "dicom" else None
    std_path = std_output_path(output_path)
    # Removed before the output is replaced: a failure in between leaves no map of another run.
    remove_output(std_path)
    write_output(thin, template, output_path)
    if std_hu is not None:
        write_output(replace(thin, hu=std_hu), template, std_path, STD_SERIES)
    return {
        "input": str(input_path),
        "output": str(output_path),
        "std_output": None if std_hu is None else str(std_path),
        "format": fmt,
        "source": thick.source,
        "n_thick": volume.shape[0],
        "n_thin": thin.shape[0],
        "resized_from": None if volume is thick.volume else list(thick.volume.shape[1:]),
        "thick_mm": round(float(thick_mm), 4),
        "thin_mm": float(thin_mm),
        "seconds": round(time.perf_counter() - started, 3),
    }


def infer_batch(
    input_dir: str | Path,
    output_dir: str | Path,
    predictor: Predictor,
    window: tuple[float, float],
    thin_mm: float,
    fmt: OutputFormat = "nifti",
    progress: Progress | None = None,
    resolution: int | None = None,
) -> list[dict]:
    """`infer_case` on every case under `input_dir`: output_dir/<id>.nii.gz or output_dir/<id>/.

    A case that fails on its data gets status "failed" and its reason; the others are still
    done. Each entry has id, category, input, output, std_output, status ("ok" | "failed") and
    reason.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt={fmt!r}: use 'nifti' or 'dicom'")
    refs = discover_inputs(input_dir)
    if not refs:
        raise ValueError("no cases (ZIP, DICOM folder, .nii or .nii.gz) found in the input folder")
    outputs = [output_path(output_dir, ref.id, fmt) for ref in refs]
    for out in outputs:
        check_output(out)  # refuse a non-empty foreign folder before hours of sampling
    check_std_clashes(refs, outputs)
    results = []
    for k, (ref, out) in enumerate(zip(refs, outputs)):
        results.append(infer_entry(ref, out, predictor, window, thin_mm, resolution))
        if progress is not None:
            progress({"done": k + 1, "total": len(refs), "id": ref.id, "status": results[-1]["status"]})
    return results


def check_std_clashes(refs: list[CaseRef], outputs: list[Path]) -> None:
    """Refuse case ids such as "a" and "a_std": the second's output is the first's std map."""
    case_of = {out: ref.id for ref, out in zip(refs, outputs)}
    for ref, out in zip(refs, outputs):
        other = case_of.get(std_output_path(out))
        if other is not None:
            raise ValueError(f"the output of case {other!r} is where the uncertainty map of case "
                             f"{ref.id!r} goes; rename one of them")


def output_path(output_dir: str | Path, case_id: str, fmt: OutputFormat) -> Path:
    """Where a batch puts a case's output: output_dir/<id>.nii.gz, or the folder output_dir/<id>/."""
    return Path(output_dir) / (f"{case_id}.nii.gz" if fmt == "nifti" else case_id)


def infer_entry(
    ref: CaseRef, output_path: str | Path, predictor: Predictor, window: tuple[float, float], thin_mm: float,
    resolution: int | None = None,
) -> dict:
    """`infer_case` as one entry of a batch: id, category, input, output, std_output, status
    ("ok" | "failed"), reason, and the summary; a case that fails on its data is "failed", not
    raised."""
    entry = {"id": ref.id, "category": ref.category, "input": ref.path}
    try:
        summary = infer_case(ref.path, output_path, predictor, window, thin_mm, resolution=resolution)
    except CaseError as exc:
        return {**entry, "output": None, "std_output": None, "status": "failed", "reason": exc.reason}
    return {**entry, **summary, "status": "ok", "reason": None}


def discover_inputs(input_dir: str | Path) -> list[CaseRef]:
    """Cases as `ctdiff.cases.discover_cases` finds them, plus .nii/.nii.gz files.

    `<input>/<case>`, or `<input>/<category>/<case>`, where a case is a ZIP, a NIfTI file or a
    DICOM folder. A top-level folder holding files other than cases is itself a DICOM case.
    Ids come from file names (NIfTI suffixes dropped) and must be unique.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError("the input folder does not exist")
    refs: list[CaseRef] = []

    def add(path: Path, category: str) -> None:
        refs.append(CaseRef(id=_input_id(path), path=str(path.resolve()), category=category))

    for entry in _visible(input_dir):
        if entry.is_file():
            if _is_case_file(entry):
                add(entry, UNCATEGORIZED)
            continue
        children = _visible(entry)
        holds_cases = any(c.is_file() and _is_case_file(c) for c in children)
        holds_other_files = any(c.is_file() and not _is_case_file(c) for c in children)
        if holds_other_files and not holds_cases:
            add(entry, UNCATEGORIZED)
            continue
        for child in children:
            if child.is_dir() or _is_case_file(child):
                add(child, entry.name)
    return check_unique_ids(refs)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_case_file(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or is_nifti_path(path)


def _input_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _case_id(name)  # the store's ids, so outputs line up with its manifest


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    if len(window) != 2:
        raise ValueError(f"window must be (center_hu, width_hu), got {window!r}")
    center_hu, width_hu = (float(v) for v in window)
    if not width_hu > 0:
        raise ValueError(f"window width must be positive, got {width_hu} HU")
    return center_hu, width_hu


def as_prediction(output: np.ndarray | tuple[np.ndarray, np.ndarray],
                  shape: tuple[int, int, int]) -> Prediction:
    """A predictor's return value (an array, or (mean, std)) as a checked `Prediction` of
    `shape` (N, H, W): float32, the mean clipped to [0, 1], the std finite and non-negative."""
    if isinstance(output, tuple):  # Prediction is a tuple too
        if len(output) != 2:
            raise ValueError(f"predictor returned a tuple of {len(output)}; expected an array or (mean, std)")
        mean, std = output
    else:
        mean, std = output, None
    mean = np.asarray(mean)
    if mean.shape != shape:
        raise ValueError(f"predictor returned shape {mean.shape}, expected {shape}")
    mean = mean.astype(np.float32, copy=False)
    if not np.all(np.isfinite(mean)):
        raise ValueError("predictor returned NaN or infinite values")
    return Prediction(np.clip(mean, 0.0, 1.0), None if std is None else _check_std(std, shape))


def _check_std(std: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    std = np.asarray(std)
    if std.shape != shape:
        raise ValueError(f"predictor returned a std of shape {std.shape}, expected {shape} (the mean's)")
    std = std.astype(np.float32, copy=False)
    if not np.all(np.isfinite(std)):
        raise ValueError("predictor returned a std with NaN or infinite values")
    if np.any(std < 0):
        raise ValueError(f"predictor returned a negative std (min {float(std.min()):g})")
    return std  # (N, H, W)


def _predict(predictor: Predictor, volume: Volume, thin_z: np.ndarray, center_hu: float,
             width_hu: float) -> Prediction:
    """Run the predictor on the windowed thick volume and check what it returns."""
    x = volume.window(center_hu, width_hu)  # (D, H, W) in [0, 1]
    output = predictor(x, volume.z_mm.copy(), thin_z.copy())
    return as_prediction(output, (thin_z.size, *volume.shape[1:]))
