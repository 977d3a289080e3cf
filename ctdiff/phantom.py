"""A procedural chest CT phantom in Hounsfield units, on any grid, deterministic for a seed.

Anatomy is defined in millimetres in patient space (x to the patient's left, y to the back,
z to the head; rows of an image run along +x, so the spine is at the bottom), so the same rng
state gives the same chest at any pixel size or slice spacing. Edges are anti-aliased
(partial-volume fractions), which is what makes thin slices differ from thick ones at
boundaries. Noise is left to the caller, so thick and thin series can each get their own.

The volume is centred on z = 0 mm; index 0 is the head end (highest z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_LUNG = -850.0
HU_CONTRAST = 300.0  # contrast-filled arteries in a CT pulmonary angiogram
HU_HEART = 150.0  # blood pool, contrast partly mixed
HU_BONE = 700.0
HU_DISC = 90.0
HU_NODULE = 30.0
HU_CLOT = 30.0  # a filling defect (embolus) inside an enhanced artery


@dataclass(frozen=True)
class _Chest:
    """The per-seed shape parameters, in mm; z_shift moves the anatomy against the grid."""

    body_a: float  # lateral semi-axis of the body
    body_b: float  # antero-posterior semi-axis
    fat_mm: float  # subcutaneous fat thickness
    z_shift: float  # z of the lungs' widest cross-section
    lung_half_height: float  # lungs shrink to nothing this far above/below z_shift
    lung_wobble: tuple  # (periods, phases, amplitudes) of the lungs' cross-section changes

    @property
    def heart_z(self) -> float:
        return self.z_shift - 60.0


def _curve(rng: np.random.Generator, amp_mm: float, period_mm=(50.0, 220.0), n_terms: int = 3):
    """A smooth random function of z: a few sinusoids; returns (periods, phases, amplitudes)."""
    periods = rng.uniform(*period_mm, n_terms)
    phases = rng.uniform(0.0, 2 * np.pi, n_terms)
    amps = amp_mm * rng.uniform(0.3, 1.0, n_terms) / np.sqrt(n_terms)
    return periods, phases, amps


def _eval(curve, z_mm: np.ndarray) -> np.ndarray:
    periods, phases, amps = curve
    z = np.asarray(z_mm, dtype=np.float64)[..., None]
    return (amps * np.sin(2 * np.pi * z / periods + phases)).sum(-1)


def _lung_ellipses(chest: _Chest, z_mm: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """(cx, cy, semi_x, semi_y) per slice for the right then left lung; semi-axes 0 = absent."""
    rel = (np.asarray(z_mm, dtype=np.float64) - chest.z_shift) / chest.lung_half_height
    profile = np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0))  # apex and base taper to nothing
    wobble = 1.0 + _eval(chest.lung_wobble, z_mm) / 100.0
    out = []
    for side in (-1.0, 1.0):
        cx = np.full_like(profile, side * 0.44 * chest.body_a)
        cy = np.full_like(profile, -0.05 * chest.body_b)
        sx = 0.33 * chest.body_a * profile * wobble
        sy = 0.62 * chest.body_b * profile * (2.0 - wobble)
        out.append((cx, cy, sx, sy))
    return out


def _inside_lung(chest: _Chest, x: float, y: float, z: float, margin: float = 0.8) -> bool:
    for cx, cy, sx, sy in _lung_ellipses(chest, np.array([z])):
        if sx[0] > 0 and ((x - cx[0]) / sx[0]) ** 2 + ((y - cy[0]) / sy[0]) ** 2 < margin**2:
            return True
    return False


def _fraction(dist_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (negative inside), one pixel of ramp."""
    return np.clip(0.5 - dist_mm / pixel_mm, 0.0, 1.0, dtype=np.float32)


def _paint(block: np.ndarray, weight: np.ndarray, hu: float) -> None:
    """Blend `hu` into `block` in place with partial-volume `weight` (broadcastable)."""
    block += weight * (np.float32(hu) - block)


def _span(coord: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of a sorted coordinate vector inside [lo, hi], one pixel of slack."""
    step = coord[1] - coord[0] if len(coord) > 1 else 1.0
    i0 = int(np.clip(np.floor((lo - coord[0]) / step) - 1, 0, len(coord)))
    i1 = int(np.clip(np.ceil((hi - coord[0]) / step) + 2, 0, len(coord)))
    return slice(i0, max(i0, i1))


def _ellipse_2d(x, y, cx, cy, sx, sy, pixel_mm):
    """Partial-volume fraction of an axis-aligned ellipse on broadcastable x/y grids (mm)."""
    u, v = (x - cx) / sx, (y - cy) / sy
    rho = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / sx) ** 2 + (v / sy) ** 2) / np.maximum(rho, 1e-6)  # |d rho / d mm|
    return _fraction((rho - 1.0) / np.maximum(grad, 1e-6), pixel_mm)


@dataclass(frozen=True)
class _Tube:
    """A vessel: a circular cross-section whose centre wanders smoothly along z."""

    x: float
    y: float
    radius: float
    z_lo: float
    z_hi: float
    hu: float
    wander: tuple
    in_lung: bool  # clipped to lung tissue (peripheral branches)
    pulmonary: bool  # can hold an embolus


def _draw_tube(vol, tube: _Tube, x, y, z, pixel_mm, clot=None) -> None:
    """Paint one tube in place; `clot` = (z_lo, z_hi, offset_x, offset_y, radius), the offsets
    and radius as fractions of the tube's radius."""
    zs = np.nonzero((z >= tube.z_lo) & (z <= tube.z_hi))[0]
    if zs.size == 0:
        return
    zsl = slice(zs[0], zs[-1] + 1)
    zz = z[zsl]
    dx, dy = _eval(tube.wander[0], zz), _eval(tube.wander[1], zz)
    cx, cy = tube.x + dx, tube.y + dy  # (d,)
    # Taper over the last 10 mm so branches end, rather than stop, inside the volume.
    taper = np.clip(np.minimum(zz - tube.z_lo, tube.z_hi - zz) / 10.0, 0.3, 1.0)
    rad = tube.radius * taper  # (d,)
    ys = _span(y, cy.min() - tube.radius, cy.max() + tube.radius)
    xs = _span(x, cx.min() - tube.radius, cx.max() + tube.radius)
    block = vol[zsl, ys, xs]  # (d, h, w) view
    ddx = x[None, None, xs] - cx[:, None, None].astype(np.float32)
    ddy = y[None, ys, None] - cy[:, None, None].astype(np.float32)
    dist = np.sqrt(ddx * ddx + ddy * ddy)  # (d, h, w)
    weight = _fraction(dist - rad[:, None, None].astype(np.float32), pixel_mm)
    if tube.in_lung:
        weight *= np.clip((-350.0 - block) / 300.0, 0.0, 1.0)
    _paint(block, weight, tube.hu)
    if clot is not None:
        z_lo, z_hi, off_x, off_y, frac = clot
        inside_z = ((zz >= z_lo) & (zz <= z_hi)).astype(np.float32)[:, None, None]
        ex, ey = ddx - off_x * tube.radius, ddy - off_y * tube.radius
        cdist = np.sqrt(ex * ex + ey * ey) - (frac * rad)[:, None, None].astype(np.float32)
        # Clot replaces contrast in the part of the voxel the vessel fills, never more.
        clot_w = np.minimum(_fraction(cdist, pixel_mm) * inside_z, weight)
        block -= clot_w * np.float32(tube.hu - HU_CLOT)


def _vessels(chest: _Chest, rng: np.random.Generator) -> list[_Tube]:
    a, b, zh = chest.body_a, chest.body_b, chest.heart_z
    big = [  # (x/a, y/b, radius mm, z range relative to the heart, HU, pulmonary)
        (0.18, 0.38, 11.0, (-400.0, 400.0), 280.0, False),  # descending aorta
        (-0.05, -0.12, 14.0, (20.0, 400.0), 280.0, False),  # ascending aorta
        (0.12, -0.25, 12.0, (20.0, 60.0), HU_CONTRAST, True),  # pulmonary trunk
        (-0.28, -0.02, 8.0, (25.0, 75.0), HU_CONTRAST, True),  # right pulmonary artery
        (0.28, -0.02, 8.0, (25.0, 75.0), HU_CONTRAST, True),  # left pulmonary artery
        (-0.20, -0.15, 9.0, (20.0, 400.0), 400.0, False),  # superior vena cava, dense inflow
    ]
    tubes = []
    for fx, fy, r, (lo, hi), hu, pulm in big:
        wander = (_curve(rng, 3.0), _curve(rng, 3.0))
        tubes.append(_Tube(fx * a, fy * b, r, zh + lo, zh + hi, hu, wander, False, pulm))
    for side in (-1.0, 1.0):  # peripheral branches, clipped to the lung they run in
        for _ in range(22):
            ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.0, 0.7))
            x = side * 0.44 * a + rad * np.cos(ang) * 0.33 * a
            y = -0.05 * b + rad * np.sin(ang) * 0.62 * b
            z_lo = rng.uniform(-220.0, 180.0) + chest.z_shift
            z_hi = z_lo + rng.uniform(40.0, 200.0)
            radius = rng.uniform(1.0, 3.5)
            wander = (_curve(rng, 10.0, (40.0, 160.0)), _curve(rng, 10.0, (40.0, 160.0)))
            tubes.append(_Tube(x, y, radius, z_lo, z_hi, HU_CONTRAST, wander, True, radius >= 2.5))
    return tubes


def _draw_ribs(vol, chest: _Chest, x, y, z, pixel_mm, rng: np.random.Generator) -> None:
    """Ribs: oblique bands near the inner body wall, periodic in z, dropping towards the front."""
    a, b = chest.body_a, chest.body_b
    u, v = x[None, :] / a, y[:, None] / b  # (1, W), (H, 1)
    rho = np.sqrt(u * u + v * v)
    depth = (1.0 - rho) * np.sqrt(a * b)  # approximate mm inside the skin
    centre_depth = chest.fat_mm + 9.0
    rows, cols = np.nonzero(np.abs(depth - centre_depth) < 5.0 + pixel_mm)
    if rows.size == 0:
        return
    phi = np.arctan2(v[rows, 0], u[0, cols])  # +pi/2 = straight back
    # No ribs at the front midline (sternum, cartilage) nor the back midline (spine).
    keep = (np.abs(x[cols]) > 0.18 * a) | ((y[rows] > 0) & (np.abs(x[cols]) > 0.12 * a))
    rows, cols, phi = rows[keep], cols[keep], phi[keep]
    pitch = rng.uniform(24.0, 30.0)
    phase = rng.uniform(0.0, pitch)
    drop = rng.uniform(1.0, 1.6) * pitch  # a rib's front end lies this far below its back end
    rib_z = z[:, None] + drop * (1.0 - np.sin(phi))[None, :] / 2.0 - phase  # (D, N)
    dz = rib_z - pitch * np.round(rib_z / pitch)  # mm from the nearest rib's centre line
    radial = (depth[rows, cols] - centre_depth)[None, :]
    # An elliptical rib cross-section, 10 mm tall (z) and 8 mm thick (radial).
    dist = (np.sqrt((dz / 5.0) ** 2 + (radial / 4.0) ** 2) - 1.0) * 4.0
    weight = _fraction(dist, pixel_mm)
    vals = vol[:, rows, cols]
    vals += weight * (np.float32(HU_BONE) - vals)
    vol[:, rows, cols] = vals


def _draw_spine(vol, chest: _Chest, x, y, z, pixel_mm, rng: np.random.Generator) -> None:
    b = chest.body_b
    yc = 0.5 * b
    pitch, phase = rng.uniform(25.0, 30.0), rng.uniform(0.0, 30.0)
    dz = z - phase - pitch * np.round((z - phase) / pitch)
    body_hu = np.where(np.abs(dz) < 2.5, HU_DISC, HU_BONE).astype(np.float32)  # (D,) discs
    parts = [  # (cx, cy, sx, sy, hu per slice): vertebral body, arch, canal, spinous process
        (0.0, yc, 16.0, 14.0, body_hu),
        (0.0, yc + 22.0, 14.0, 10.0, HU_BONE),
        (0.0, yc + 21.0, 7.0, 7.0, 20.0),
        (0.0, yc + 38.0, 4.0, 10.0, HU_BONE),
    ]
    for cx, cy, sx, sy, hu in parts:
        ys, xs = _span(y, cy - sy, cy + sy), _span(x, cx - sx, cx + sx)
        w = _ellipse_2d(x[None, xs], y[ys, None], cx, cy, sx, sy, pixel_mm)  # (h, w)
        hu = np.broadcast_to(np.asarray(hu, dtype=np.float32), z.shape)[:, None, None]
        block = vol[:, ys, xs]
        block += w[None] * (hu - block)


def chest_phantom(
    n_slices: int,
    size: int,
    pixel_mm: float,
    slice_mm: float,
    rng: np.random.Generator,
    *,
    emboli: bool = False,
) -> np.ndarray:
    """A noiseless chest CT, float32 HU, (n_slices, size, size), index 0 at the head end.

    Body (soft tissue with a subcutaneous fat layer), two lungs whose cross-section changes
    along z, a heart, contrast-filled arteries and veins (large mediastinal ones and wandering
    peripheral branches in the lungs), spine, ribs, sternum and 2-5 lung nodules. With
    `emboli`, 1-3 pulmonary arteries that cross the volume hold a filling defect (~30 HU clot).
    Pixel centres are at (i - (size - 1) / 2) * pixel_mm, slice centres at
    ((n_slices - 1) / 2 - k) * slice_mm.
    """
    if n_slices < 1 or size < 2 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError("chest_phantom needs n_slices >= 1, size >= 2 and positive spacings")
    x = ((np.arange(size) - (size - 1) / 2) * pixel_mm).astype(np.float32)  # (W,) mm
    y = x.copy()  # (H,) mm, +y towards the back
    z = ((n_slices - 1) / 2 - np.arange(n_slices)) * slice_mm  # (D,) mm, head first
    chest = _Chest(
        body_a=rng.uniform(150.0, 168.0),
        body_b=rng.uniform(105.0, 122.0),
        fat_mm=rng.uniform(8.0, 18.0),
        z_shift=rng.uniform(-40.0, 40.0),
        lung_half_height=rng.uniform(140.0, 170.0),
        lung_wobble=_curve(rng, 8.0, (40.0, 150.0)),
    )
    a, b = chest.body_a, chest.body_b

    # Body and sternum do not change along z: paint one plane, then copy it to every slice.
    plane = np.full((size, size), HU_AIR, dtype=np.float32)  # (H, W)
    _paint(plane, _ellipse_2d(x[None], y[:, None], 0, 0, a, b, pixel_mm), HU_FAT)
    inner = _ellipse_2d(x[None], y[:, None], 0, 0, a - chest.fat_mm, b - chest.fat_mm, pixel_mm)
    _paint(plane, inner, HU_SOFT)
    sy = -b + chest.fat_mm + 12.0
    _paint(plane, _ellipse_2d(x[None], y[:, None], 0, sy, 13.0, 6.0, pixel_mm), HU_BONE)
    vol = np.broadcast_to(plane, (n_slices, size, size)).copy()  # (D, H, W)

    for cx, cy, sx, sy_ in _lung_ellipses(chest, z):
        present = np.nonzero(sx > pixel_mm)[0]
        if present.size == 0:
            continue
        zsl = slice(present[0], present[-1] + 1)
        ys = _span(y, cy.min() - sy_.max(), cy.max() + sy_.max())
        xs = _span(x, cx.min() - sx.max(), cx.max() + sx.max())
        w = _ellipse_2d(
            x[None, None, xs], y[None, ys, None],
            cx[zsl, None, None].astype(np.float32), cy[zsl, None, None].astype(np.float32),
            sx[zsl, None, None].astype(np.float32), sy_[zsl, None, None].astype(np.float32),
            pixel_mm,
        )  # (d, h, w)
        _paint(vol[zsl, ys, xs], w, HU_LUNG)

    # The heart sits low in the chest and pushes into the left lung.
    hz = np.sqrt(np.clip(1.0 - ((z - chest.heart_z) / 60.0) ** 2, 0.0, 1.0))  # (D,)
    present = np.nonzero(hz > 0.05)[0]
    if present.size:
        zsl = slice(present[0], present[-1] + 1)
        hcx, hcy, hsx, hsy = 0.12 * a, -0.2 * b, 0.36 * a, 0.42 * b
        ys, xs = _span(y, hcy - hsy, hcy + hsy), _span(x, hcx - hsx, hcx + hsx)
        scale = hz[zsl, None, None].astype(np.float32)
        w = _ellipse_2d(x[None, None, xs], y[None, ys, None], hcx, hcy,
                        hsx * scale, hsy * scale, pixel_mm)  # (d, h, w)
        _paint(vol[zsl, ys, xs], w, HU_HEART)

    tubes = _vessels(chest, rng)
    nodules = []
    for _ in range(int(rng.integers(2, 6))):
        radius = rng.uniform(2.0, 5.0)
        for _attempt in range(200):  # rejection-sample a centre well inside a lung
            p = (rng.uniform(-a, a), rng.uniform(-b, b), rng.uniform(z.min(), z.max()))
            if _inside_lung(chest, *p):
                nodules.append((p, radius))
                break
    # Bone gets its own stream, drawn before the optional emboli, so emboli change nothing else.
    bone_rng = np.random.default_rng(rng.integers(2**63))
    clots = {}
    if emboli:
        z_lo, z_hi = z.min(), z.max()
        candidates = [i for i, t in enumerate(tubes)
                      if t.pulmonary and t.z_hi - 5 > z_lo and t.z_lo + 5 < z_hi]
        n = min(len(candidates), int(rng.integers(1, 4)))
        for i in rng.choice(candidates, size=n, replace=False) if n else []:
            t = tubes[int(i)]
            lo, hi = max(t.z_lo, z_lo), min(t.z_hi, z_hi)
            centre, length = rng.uniform(lo, hi), rng.uniform(8.0, 25.0)
            ang = rng.uniform(0, 2 * np.pi)
            clots[int(i)] = (centre - length / 2, centre + length / 2,
                             0.25 * np.cos(ang), 0.25 * np.sin(ang), 0.6)

    for i, tube in enumerate(tubes):
        _draw_tube(vol, tube, x, y, z, pixel_mm, clots.get(i))
    for (px, py, pz), radius in nodules:
        zs = np.nonzero(np.abs(z - pz) < radius + slice_mm)[0]
        if zs.size == 0:
            continue
        zsl = slice(zs[0], zs[-1] + 1)
        ys, xs = _span(y, py - radius, py + radius), _span(x, px - radius, px + radius)
        dz, dy, dx = z[zsl, None, None] - pz, y[None, ys, None] - py, x[None, None, xs] - px
        dist = np.sqrt(dz * dz + dy * dy + dx * dx).astype(np.float32) - radius  # (d, h, w)
        _paint(vol[zsl, ys, xs], _fraction(dist, min(pixel_mm, slice_mm)), HU_NODULE)
    _draw_spine(vol, chest, x, y, z, pixel_mm, bone_rng)
    _draw_ribs(vol, chest, x, y, z, pixel_mm, bone_rng)
    return vol
