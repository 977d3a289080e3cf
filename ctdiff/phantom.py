"""A procedural chest CT phantom in Hounsfield units, on any grid, deterministic for a seed.

Anatomy is defined in millimetres in patient space (x to the patient's left, y to the back,
z to the head; rows of an image run along +x, so the spine is at the bottom), so the same rng
state gives the same chest at any pixel size or slice spacing. Edges are anti-aliased
(partial-volume fractions over one voxel, measured along the edge's normal), which is what
makes thin slices differ from thick ones at boundaries; vessels and nodules thinner than a
voxel keep their amount of contrast, as averaging a finer image would, so on a coarse grid
they fade rather than swell. Noise is left to the caller, so thick and thin series can each
get their own.

Much of the anatomy is there for its through-plane detail, the part a 5 mm slab blurs:
branching pulmonary vessel trees that cross slices obliquely, 3-8 mm nodules, ribs that run
obliquely through axial slices, vertebral endplates and discs a few mm thick, neural arches
over part of each level, and processes that slant out of the axial plane.

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
HU_VEIN = 200.0  # pulmonary veins: the contrast bolus is past its peak there
HU_HEART = 150.0  # blood pool, contrast partly mixed
HU_BONE = 700.0  # cortical bone
HU_CANCELLOUS = 200.0  # the marrow-filled inside of a vertebral body
HU_DISC = 90.0
HU_CARTILAGE = 120.0  # costal cartilage, partly calcified
HU_NODULE = 30.0
HU_GROUND_GLASS = -550.0  # the hazy rim of a part-solid nodule
HU_CLOT = 30.0  # a filling defect (embolus) inside an enhanced artery

R_LEAF_MM = 0.5  # the finest vessels drawn: 1 mm across
MURRAY_EXPONENT = 2.2  # radius goes as (leaves fed) ** (1 / exponent): ~5 mm segmental arteries
_KINK_MM = 8.0  # branches longer than this bend in the middle; shorter ones are one piece
# Leaves per lung and tree: more makes denser trees and a slower phantom. Murray's law then
# gives vessels about 1 cm across at the hila.
_ARTERY_LEAVES, _VEIN_LEAVES = 350, 250


@dataclass(frozen=True)
class _Grid:
    """Voxel centres in mm: x (W,), y (H,) ascending, z (D,) descending (head first)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    pixel_mm: float
    slice_mm: float

    def reach(self) -> tuple[float, float]:
        """How far (mm) a one-voxel ramp can reach past an edge: (along z, in-plane)."""
        p2, s2 = self.pixel_mm**2, self.slice_mm**2
        return float(np.sqrt(s2 + p2 / 4)), float(np.sqrt(p2 + s2 / 4))

    def ramp(self, normal_z2: np.ndarray) -> np.ndarray:
        """A voxel's extent (mm) along an edge normal whose squared z component is normal_z2."""
        p2, s2 = self.pixel_mm**2, self.slice_mm**2
        return np.sqrt(p2 + (s2 - p2) * normal_z2, dtype=np.float32)


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


def _heart_ellipse(chest: _Chest, z_mm: np.ndarray) -> tuple[np.ndarray, ...]:
    """(cx, cy, semi_x, semi_y) of the heart per slice, like `_lung_ellipses`: it sits low and
    pushes into the left lung."""
    a, b = chest.body_a, chest.body_b
    scale = np.sqrt(np.clip(1.0 - ((np.asarray(z_mm) - chest.heart_z) / 60.0) ** 2, 0.0, 1.0))
    return (np.full_like(scale, 0.12 * a), np.full_like(scale, -0.2 * b),
            0.36 * a * scale, 0.42 * b * scale)


def _in_lungs(chest: _Chest, pts_mm: np.ndarray, margin: float = 0.8) -> np.ndarray:
    """Which points (N, 3) lie well inside a lung (within `margin` of its radii), not in the
    heart."""
    x, y, z = pts_mm.T
    inside = np.zeros(len(pts_mm), dtype=bool)
    for cx, cy, sx, sy in _lung_ellipses(chest, z):
        present = sx > 0
        u = (x - cx) / np.where(present, sx, 1.0)
        v = (y - cy) / np.where(present, sy, 1.0)
        inside |= present & (u * u + v * v < margin**2)
    hx, hy, hsx, hsy = _heart_ellipse(chest, z)
    with np.errstate(divide="ignore", invalid="ignore"):
        in_heart = ((x - hx) / hsx) ** 2 + ((y - hy) / hsy) ** 2 < 1.0  # NaN (no heart) is False
    return inside & ~in_heart


def _fraction(dist_mm: np.ndarray, ramp_mm) -> np.ndarray:
    """Partial-volume fraction from a signed distance (negative inside), one voxel of ramp."""
    return np.clip(0.5 - dist_mm / ramp_mm, 0.0, 1.0, dtype=np.float32)


def _round_fraction(dist_mm, radius_mm, ramp_mm, dims: int) -> np.ndarray:
    """Partial-volume fraction of a tube (dims=2, `dist_mm` from its axis) or a ball (dims=3).

    The ramp is centred on the edge that keeps the object's cross-section area (tube) or volume
    (ball) exact; an object too thin for that is drawn one voxel wide at lower contrast. Either
    way a voxel holds as much of it on every grid, which is what area-averaging a finer image
    gives, rather than a 1 mm vessel looking a voxel wide at full contrast on a coarse grid.
    """
    half2 = 0.25 * ramp_mm * ramp_mm
    if dims == 2:  # area of the ramped disc: pi (edge^2 + ramp^2 / 12)
        edge = np.sqrt(np.maximum(radius_mm * radius_mm - half2 / 3, half2))
        scale = np.minimum(radius_mm * radius_mm / (4 * half2 / 3), 1.0)
    else:  # volume of the ramped ball: 4/3 pi (edge^3 + edge ramp^2 / 4); Cardano's root
        cube = radius_mm**3
        root = np.sqrt(cube * cube / 4 + (half2 / 3) ** 3)
        edge = np.maximum(np.cbrt(cube / 2 + root) + np.cbrt(cube / 2 - root), np.sqrt(half2))
        scale = np.minimum(cube / (2 * half2 * np.sqrt(half2)), 1.0)
    return _fraction(dist_mm - edge, ramp_mm) * scale


def _paint(block: np.ndarray, weight: np.ndarray, hu: float) -> None:
    """Blend `hu` into `block` in place with partial-volume `weight` (broadcastable)."""
    block += weight * (np.float32(hu) - block)


def _lung_only(block: np.ndarray) -> np.ndarray:
    """Weight 1 in lung, fading to 0 in tissue: peripheral vessels stop at the lung's edge."""
    return np.clip((-350.0 - block) / 300.0, 0.0, 1.0)


def _index_spans(coord: np.ndarray, lo, hi, slack: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(first index, count) of the samples of an evenly spaced coordinate vector (either
    direction) covering each [lo, hi] (arrays), `slack` samples more at each end."""
    step = coord[1] - coord[0] if len(coord) > 1 else 1.0
    a, b = (np.asarray(lo) - coord[0]) / step, (np.asarray(hi) - coord[0]) / step
    i0 = np.clip(np.floor(np.minimum(a, b)) - slack, 0, len(coord)).astype(np.int64)
    i1 = np.clip(np.ceil(np.maximum(a, b)) + 1 + slack, 0, len(coord)).astype(np.int64)
    return i0, np.maximum(i1 - i0, 0)


def _span(coord: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of an evenly spaced coordinate vector covering [lo, hi], one sample of slack."""
    start, count = _index_spans(coord, lo, hi, slack=1)
    return slice(int(start), int(start + count))


def _ellipse_2d(x, y, cx, cy, sx, sy, pixel_mm):
    """Partial-volume fraction of an axis-aligned ellipse on broadcastable x/y grids (mm)."""
    u, v = (x - cx) / sx, (y - cy) / sy
    rho = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / sx) ** 2 + (v / sy) ** 2) / np.maximum(rho, 1e-6)  # |d rho / d mm|
    return _fraction((rho - 1.0) / np.maximum(grad, 1e-6), pixel_mm)


@dataclass(frozen=True)
class _Tube:
    """A mediastinal vessel: a circular cross-section whose centre wanders smoothly along z."""

    x: float
    y: float
    radius: float
    z_lo: float
    z_hi: float
    hu: float
    wander: tuple
    pulmonary: bool  # can hold an embolus


def _draw_tube(vol, tube: _Tube, grid: _Grid, clot=None) -> None:
    """Paint one tube in place; `clot` = (z_lo, z_hi, offset_x, offset_y, radius), the offsets
    and radius as fractions of the tube's radius."""
    x, y, z = grid.x, grid.y, grid.z
    zs = np.nonzero((z >= tube.z_lo) & (z <= tube.z_hi))[0]
    if zs.size == 0:
        return
    zsl = slice(zs[0], zs[-1] + 1)
    zz = z[zsl].astype(np.float64)
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
    weight = _fraction(dist - rad[:, None, None].astype(np.float32), grid.pixel_mm)
    _paint(block, weight, tube.hu)
    if clot is not None:
        z_lo, z_hi, off_x, off_y, frac = clot
        inside_z = ((zz >= z_lo) & (zz <= z_hi)).astype(np.float32)[:, None, None]
        ex, ey = ddx - off_x * tube.radius, ddy - off_y * tube.radius
        cdist = np.sqrt(ex * ex + ey * ey) - (frac * rad)[:, None, None].astype(np.float32)
        # Clot replaces contrast in the part of the voxel the vessel fills, never more.
        clot_w = np.minimum(_fraction(cdist, grid.pixel_mm) * inside_z, weight)
        block -= clot_w * np.float32(tube.hu - HU_CLOT)


def _vessels(chest: _Chest, rng: np.random.Generator) -> list[_Tube]:
    """The great vessels of the mediastinum that run mostly along z."""
    a, b, zh = chest.body_a, chest.body_b, chest.heart_z
    big = [  # (x/a, y/b, radius mm, z range relative to the heart, HU, pulmonary)
        (0.18, 0.38, 11.0, (-400.0, 400.0), 280.0, False),  # descending aorta
        (-0.05, -0.12, 14.0, (20.0, 400.0), 280.0, False),  # ascending aorta
        (0.12, -0.25, 12.0, (20.0, 60.0), HU_CONTRAST, True),  # pulmonary trunk
        (-0.20, -0.15, 9.0, (20.0, 400.0), 400.0, False),  # superior vena cava, dense inflow
    ]
    tubes = []
    for fx, fy, r, (lo, hi), hu, pulm in big:
        wander = (_curve(rng, 3.0), _curve(rng, 3.0))
        tubes.append(_Tube(fx * a, fy * b, r, zh + lo, zh + hi, hu, wander, pulm))
    return tubes


@dataclass(frozen=True)
class _Segments:
    """Straight tube pieces (vessels, airways, bony processes) of one HU: capsules from p0 to p1
    whose radius runs linearly from r0 to r1."""

    p0: np.ndarray  # (N, 3) x, y, z in mm
    p1: np.ndarray  # (N, 3)
    r0: np.ndarray  # (N,) mm
    r1: np.ndarray  # (N,) mm
    hu: float


def _pulmonary_arteries(chest: _Chest) -> _Segments:
    """The right and left pulmonary arteries, from the top of the trunk out to the hila where
    the artery trees start: they run across the slices, the right one behind the aorta, the
    left one arching up first."""
    a, b, zh = chest.body_a, chest.body_b, chest.heart_z
    ends = [  # (x/a, y/b, z above the heart) along each artery
        [(0.10, -0.22, 60.0), (-0.08, 0.07, 56.0), (-0.28, -0.02, 50.0)],
        [(0.13, -0.22, 62.0), (0.22, 0.0, 66.0), (0.28, -0.02, 50.0)],
    ]
    pts = np.array([[(fx * a, fy * b, zh + dz) for fx, fy, dz in path] for path in ends])
    p0, p1 = pts[:, :-1].reshape(-1, 3), pts[:, 1:].reshape(-1, 3)  # two pieces per artery
    return _Segments(p0, p1, np.array([8.0, 7.5] * 2), np.array([7.5, 7.0] * 2), HU_CONTRAST)


def _airways(chest: _Chest) -> tuple[_Segments, _Segments]:
    """(walls, lumens) of the trachea and the main bronchi, which leave the carina obliquely
    for the hila (the right one steeper): air in the mediastinum, dark in any window."""
    a, b, zh = chest.body_a, chest.body_b, chest.heart_z
    carina = [0.0, 0.17 * b, zh + 75.0]
    p0 = np.array([[0.0, 0.17 * b, zh + 400.0], carina, carina])
    p1 = np.array([carina, [-0.24 * a, 0.1 * b, zh + 45.0], [0.24 * a, 0.1 * b, zh + 55.0]])
    r0, r1 = np.array([9.0, 7.0, 6.5]), np.array([9.0, 6.0, 5.5])  # trachea, right, left
    wall_mm = 1.5
    return _Segments(p0, p1, r0 + wall_mm, r1 + wall_mm, HU_SOFT), _Segments(p0, p1, r0, r1, HU_AIR)


def _lung_points(chest: _Chest, side: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points (n, 3) uniformly at random well inside one lung (side -1 right, +1 left), mm."""
    a, b = chest.body_a, chest.body_b
    centre = np.array([side * 0.44 * a, -0.05 * b, chest.z_shift])
    half = np.array([0.4 * a, 0.7 * b, chest.lung_half_height])  # covers the lung's wobble
    lo, hi = centre - half, centre + half
    found = np.empty((0, 3))
    while len(found) < n:  # rejection sampling in the lung's bounding box
        pts = rng.uniform(lo, hi, (4 * n, 3))
        found = np.concatenate([found, pts[_in_lungs(chest, pts, margin=0.85)]])
    return found[:n]


def _grow_trees(roots_mm: np.ndarray, leaves_mm: np.ndarray, tree_of_leaf: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Vessel trees, tree k from roots_mm[k] (T, 3) out to every leaf (L, 3) with tree_of_leaf k.

    Each branch heads part way towards the centroid of the leaves it feeds, then splits them in
    two across their widest spread, so a tree fills its lung and its branches point every way.
    Radii follow Murray's law from the number of leaves fed, so vessels taper towards the
    periphery. A long branch is two pieces with a sideways kink, so vessels bend. All trees grow
    together, a generation at a time. Returns (p0, p1, r0, r1, tree) arrays of the pieces.
    """
    node = np.asarray(tree_of_leaf, dtype=np.int64)  # the branch that feeds each leaf
    start, tree = roots_mm, np.arange(len(roots_mm))  # (K, 3), (K,) per branch
    pieces = []
    while node.size:
        counts = np.bincount(node).astype(np.float64)  # (K,)
        sums = [np.bincount(node, leaves_mm[:, d]) for d in range(3)]
        centre = np.stack(sums, axis=1) / counts[:, None]  # (K, 3)
        last = counts == 1
        reach = np.where(last, 1.0, rng.uniform(0.3, 0.6, len(counts)))  # a leaf is reached
        end = start + reach[:, None] * (centre - start)
        length = np.linalg.norm(end - start, axis=1)
        axis = (end - start) / np.maximum(length, 1e-9)[:, None]
        kink = rng.normal(0.0, 0.15, (len(counts), 3)) * length[:, None]
        kink -= (kink * axis).sum(1, keepdims=True) * axis  # sideways only
        bends = length > _KINK_MM
        mid = np.where(bends[:, None], (start + end) / 2 + kink, end)
        radius = R_LEAF_MM * counts ** (1.0 / MURRAY_EXPONENT)
        r_end = radius * np.where(last, 0.6, 0.9)
        r_mid = np.where(bends, (radius + r_end) / 2, r_end)
        pieces += [(start, mid, radius, r_mid, tree),
                   tuple(p[bends] for p in (mid, end, r_mid, r_end, tree))]

        feeds_more = ~last[node]
        node, leaves_mm = node[feeds_more], leaves_mm[feeds_more]
        if not node.size:
            break
        sq = np.stack([np.bincount(node, leaves_mm[:, d] ** 2, len(counts)) for d in range(3)], 1)
        spread = sq / counts[:, None] - centre**2  # (K, 3) variance per axis
        cut = np.argmax(spread, axis=1)[node]  # (L,) the axis each leaf's branch splits across
        upper = leaves_mm[np.arange(len(node)), cut] > centre[node, cut]
        n_upper = np.bincount(node, upper, len(counts))
        stuck = ((n_upper == 0) | (n_upper == counts))[node]
        if stuck.any():  # coincident leaves: split them by their rank within the branch
            order = np.argsort(node, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(node)) - np.searchsorted(node[order], node[order])
            upper = np.where(stuck, rank % 2 == 1, upper)
        child = 2 * node + upper
        present = np.zeros(2 * len(counts), dtype=bool)
        present[child] = True
        node = (np.cumsum(present) - 1)[child]  # renumber the children 0, 1, ...
        parent = np.nonzero(present)[0] // 2
        start, tree = end[parent], tree[parent]
    return tuple(np.concatenate([p[i] for p in pieces]) for i in range(5))


def _pulmonary_trees(chest: _Chest, rng: np.random.Generator) -> tuple[_Segments, _Segments]:
    """(arteries, veins) of both lungs, branching from the hila out to 1 mm vessels."""
    a, b, zh = chest.body_a, chest.body_b, chest.heart_z
    kinds = [  # (hilum x/a, y/b, z above the heart, leaves per lung, HU)
        (0.28, -0.02, 50.0, _ARTERY_LEAVES, HU_CONTRAST),
        (0.22, 0.05, 20.0, _VEIN_LEAVES, HU_VEIN),  # veins drain to the left atrium
    ]
    sides = (-1.0, 1.0)
    lungs = [_lung_points(chest, side, sum(kind[3] for kind in kinds), rng) for side in sides]
    roots, leaves, tree_of_leaf, used = [], [], [], 0
    for fx, fy, dz, n, _ in kinds:  # trees: right and left arteries, then veins
        for side, points in zip(sides, lungs):
            tree_of_leaf.append(np.full(n, len(roots)))
            roots.append([side * fx * a, fy * b, zh + dz])
            leaves.append(points[used : used + n])
        used += n
    p0, p1, r0, r1, tree = _grow_trees(
        np.array(roots), np.concatenate(leaves), np.concatenate(tree_of_leaf), rng)
    arteries, veins = (tree // 2 == k for k in range(2))
    return tuple(_Segments(p0[m], p1[m], r0[m], r1[m], kind[-1])
                 for m, kind in zip((arteries, veins), kinds))


_BATCH_VOXELS = 1 << 20  # capsule-box voxels evaluated at once: bounds memory
_WASTE_VOXELS = 1 << 13  # padding that costs about as much as one more batch of calls


def _capsule_boxes(segs: _Segments, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """(first index, size) per capsule and axis (z, y, x): the voxels its ramp can reach."""
    along_z, in_plane = grid.reach()
    reach = np.maximum(segs.r0, segs.r1)[:, None] + np.array([in_plane, in_plane, along_z])
    lo, hi = np.minimum(segs.p0, segs.p1) - reach, np.maximum(segs.p0, segs.p1) + reach
    axes = ((2, grid.z), (1, grid.y), (0, grid.x))
    spans = [_index_spans(coord, lo[:, k], hi[:, k]) for k, coord in axes]
    return np.stack([s for s, _ in spans], 1), np.stack([n for _, n in spans], 1)


def _batches(sizes: np.ndarray) -> list[np.ndarray]:
    """Groups of capsule boxes (rows of sizes (N, 3)) to evaluate together, each padded to its
    largest size. Boxes of a size class (a factor 1.5 wide on every axis) go together; classes
    merge while the padding wasted is below _WASTE_VOXELS, which cost less than another call."""
    size_class = np.ceil(np.log(np.maximum(sizes, 1)) / np.log(1.5)).astype(np.int64)
    key = (size_class[:, 0] * 64 + size_class[:, 1]) * 64 + size_class[:, 2]
    order = np.argsort(key, kind="stable")
    volume = sizes.prod(1)
    groups, members, most, used = [], [], np.zeros(3, dtype=np.int64), 0
    for group in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
        grown = np.maximum(most, sizes[group].max(0))
        count = sum(map(len, members)) + len(group)
        padded = count * int(grown.prod())
        wasted = padded - used - int(volume[group].sum())
        if members and (padded > _BATCH_VOXELS or wasted > _WASTE_VOXELS):
            groups.append(np.concatenate(members))
            members, grown, used = [], sizes[group].max(0), 0
        members.append(group)
        most, used = grown, used + int(volume[group].sum())
    groups.append(np.concatenate(members))
    out = []
    for group in groups:  # a size class alone can still be over budget
        per_batch = max(1, _BATCH_VOXELS // int(sizes[group].max(0).prod()))
        out += [group[i : i + per_batch] for i in range(0, len(group), per_batch)]
    return out


def _capsule_weights(segs: _Segments, idx: np.ndarray, first: np.ndarray, size: np.ndarray,
                     end: np.ndarray, grid: _Grid, clot_frac: np.ndarray | None):
    """Partial-volume weights of capsules `idx` over boxes of one padded `size` from `first`
    (B, 3), cut off at index `end` (3,) (z, y, x).

    Returns the voxel indices iz, iy, ix (n,) of the voxels the capsules can reach, their
    weights (n,) and, with `clot_frac`, the clots' weights (within the vessel's, never more).
    Most of a box is out of reach, so a cheap distance to the capsule's line picks the voxels
    first and only those get the full computation.
    """
    iz, iy, ix = (np.minimum(first[:, k, None] + np.arange(size[k]), end[k] - 1)
                  for k in range(3))  # past the end, padding repeats the last voxel
    p0, axis = segs.p0[idx].astype(np.float32), (segs.p1[idx] - segs.p0[idx]).astype(np.float32)
    inv_len2 = 1.0 / np.maximum((axis * axis).sum(1), np.float32(1e-12))  # (B,)
    dx, dy = grid.x[ix] - p0[:, 0, None], grid.y[iy] - p0[:, 1, None]  # (B, w), (B, h)
    dz = grid.z[iz] - p0[:, 2, None]  # (B, d)
    ax, ay, az = (axis[:, k, None, None, None] for k in range(3))
    proj = dz[:, :, None, None] * az + dy[:, None, :, None] * ay + dx[:, None, None, :] * ax
    to_line2 = ((dz * dz)[:, :, None, None] + (dy * dy)[:, None, :, None]
                + (dx * dx)[:, None, None, :] - proj * proj * inv_len2[:, None, None, None])
    # A voxel's weight is 0 beyond max(radius, ramp / 2) + ramp / 2 (see _round_fraction).
    ramp_max = max(grid.pixel_mm, grid.slice_mm)
    reach = np.maximum(np.maximum(segs.r0[idx], segs.r1[idx]), ramp_max / 2) + ramp_max / 2
    near = to_line2 < (reach * reach + 0.01).astype(np.float32)[:, None, None, None]
    flat = np.flatnonzero(near)
    b, k, j, i = np.unravel_index(flat, near.shape)

    t = np.clip(proj.reshape(-1)[flat] * inv_len2[b], 0.0, 1.0)  # along the axis
    to_axis = axis[b] * t[:, None]  # (n, 3) from p0 to the nearest axis point
    ex, ey, ez = dx[b, i] - to_axis[:, 0], dy[b, j] - to_axis[:, 1], dz[b, k] - to_axis[:, 2]
    dist2 = ex * ex + ey * ey + ez * ez
    ramp = grid.ramp(ez * ez / np.maximum(dist2, np.float32(1e-12)))
    dist = np.sqrt(dist2)
    r0 = segs.r0[idx].astype(np.float32)
    radius = r0[b] + t * (segs.r1[idx].astype(np.float32) - r0)[b]
    weight = _round_fraction(dist, radius, ramp, dims=2)
    clot_w = None
    if clot_frac is not None:
        frac = clot_frac[idx].astype(np.float32)[b]
        clot_w = weight * _fraction(dist - frac * radius, ramp) * (frac > 0)
    return iz[b, k], iy[b, j], ix[b, i], weight, clot_w


def _draw_segments(vol, segs: _Segments, grid: _Grid, lung_only: bool,
                   clot_frac: np.ndarray | None = None) -> None:
    """Paint capsules in place as one union (the strongest capsule per voxel), optionally only
    in lung. `clot_frac` (N,) is each capsule's clot radius as a fraction of its radius (0:
    none): a clot (embolus) replaces contrast with HU_CLOT in the core of the vessel.
    """
    starts, sizes = _capsule_boxes(segs, grid)
    hit = np.nonzero(sizes.min(1) > 0)[0]
    if not hit.size:
        return
    first, last = starts[hit].min(0), (starts + sizes)[hit].max(0)
    shape = tuple(last - first)  # the region all boxes lie in
    union = np.zeros(shape, dtype=np.float32)
    clots = np.zeros_like(union) if clot_frac is not None else None
    for group in _batches(sizes[hit]):
        idx = hit[group]
        iz, iy, ix, weight, clot_w = _capsule_weights(
            segs, idx, starts[idx], sizes[idx].max(0), last, grid, clot_frac)
        flat = ((iz - first[0]) * shape[1] + (iy - first[1])) * shape[2] + (ix - first[2])
        np.maximum.at(union.reshape(-1), flat, weight)
        if clots is not None:
            np.maximum.at(clots.reshape(-1), flat, clot_w)
    block = vol[tuple(slice(a, b) for a, b in zip(first, last))]
    # Vessels fill a few percent of the region: paint only the voxels they reach.
    reached = np.unravel_index(np.flatnonzero(union), shape)
    values = block[reached]
    inside = _lung_only(values) if lung_only else np.float32(1.0)
    _paint(values, union[reached] * inside, segs.hu)
    if clots is not None:
        values -= clots[reached] * inside * np.float32(segs.hu - HU_CLOT)
    block[reached] = values


@dataclass(frozen=True)
class _Nodule:
    centre_mm: tuple[float, float, float]
    radius_mm: float
    core_fraction: float  # radius of the solid core / radius: 1 solid, < 1 part-solid


def _nodules(chest: _Chest, z: np.ndarray, rng: np.random.Generator) -> list[_Nodule]:
    """4-10 lung nodules 3-8 mm across inside the scanned range; about 1 in 4 part-solid."""
    a, b = chest.body_a, chest.body_b
    count = int(rng.integers(4, 11))
    radii = rng.uniform(1.5, 4.0, count)
    cores = np.where(rng.uniform(size=count) < 0.75, 1.0, rng.uniform(0.4, 0.7, count))
    # Rejection sampling: the first of 200 candidates per nodule that lies well inside a lung.
    candidates = rng.uniform((-a, -b, z.min()), (a, b, z.max()), (count, 200, 3))
    inside = _in_lungs(chest, candidates.reshape(-1, 3)).reshape(count, 200)
    return [_Nodule(tuple(candidates[i, np.argmax(inside[i])]), radii[i], cores[i])
            for i in range(count) if inside[i].any()]  # none when the volume misses the lungs


def _draw_ball(vol, grid: _Grid, centre_mm, radius_mm: float, hu: float) -> None:
    along_z, in_plane = grid.reach()
    cx, cy, cz = (np.float32(c) for c in centre_mm)
    zs = _span(grid.z, cz - radius_mm - along_z, cz + radius_mm + along_z)
    ys = _span(grid.y, cy - radius_mm - in_plane, cy + radius_mm + in_plane)
    xs = _span(grid.x, cx - radius_mm - in_plane, cx + radius_mm + in_plane)
    block = vol[zs, ys, xs]
    if block.size == 0:
        return
    dx, dy = grid.x[None, None, xs] - cx, grid.y[None, ys, None] - cy
    dz = grid.z[zs, None, None] - cz
    dist2 = dx * dx + dy * dy + dz * dz  # (d, h, w)
    ramp = grid.ramp(dz * dz / np.maximum(dist2, np.float32(1e-12)))
    _paint(block, _round_fraction(np.sqrt(dist2), np.float32(radius_mm), ramp, dims=3), hu)


def _draw_nodule(vol, grid: _Grid, nodule: _Nodule) -> None:
    if nodule.core_fraction < 1.0:
        _draw_ball(vol, grid, nodule.centre_mm, nodule.radius_mm, HU_GROUND_GLASS)
    _draw_ball(vol, grid, nodule.centre_mm, nodule.radius_mm * nodule.core_fraction, HU_NODULE)


@dataclass(frozen=True)
class _Levels:
    """Vertebral levels along z: discs at phase_mm + k * pitch_mm, where the ribs join."""

    pitch_mm: float
    phase_mm: float


def _draw_ribs(vol, chest: _Chest, grid: _Grid, levels: _Levels,
               rng: np.random.Generator) -> None:
    """Ribs: bands near the inner body wall, one per vertebral level, leaving the spine at its
    disc and running down towards the front, so each slice cuts 3-4 ribs per side obliquely
    and their cut ends move from slice to slice; costal cartilage joins them to the sternum."""
    x, y, z, pixel_mm = grid.x, grid.y, grid.z, grid.pixel_mm
    a, b = chest.body_a, chest.body_b
    u, v = x[None, :] / a, y[:, None] / b  # (1, W), (H, 1)
    rho = np.sqrt(u * u + v * v)
    depth = (1.0 - rho) * np.sqrt(a * b)  # approximate mm inside the skin
    centre_depth = chest.fat_mm + 9.0
    half_height, half_thick = 5.0, 3.5  # an elliptical cross-section, 10 mm by 7 mm
    rows, cols = np.nonzero(np.abs(depth - centre_depth) < half_thick + pixel_mm)
    if rows.size == 0:
        return
    phi = np.arctan2(v[rows, 0], u[0, cols])  # +pi/2 = straight back
    # No ribs at the back midline (spine) nor through the sternum; cartilage near the front.
    front, side = y[rows] < 0, np.abs(x[cols])
    keep = np.where(front, side > 13.0, side > 0.12 * a)
    rows, cols, phi = rows[keep], cols[keep], phi[keep]
    hu = np.where(front[keep] & (side[keep] < 0.18 * a), HU_CARTILAGE, HU_BONE)
    pitch, phase = levels.pitch_mm, levels.phase_mm
    drop = rng.uniform(3.0, 4.0) * pitch  # a rib's front end lies 3-4 levels below its back end
    rib_z = z[:, None] + drop * (1.0 - np.sin(phi))[None, :] / 2.0 - phase  # (D, N)
    dz = rib_z - pitch * np.round(rib_z / pitch)  # mm along z from the nearest rib's centre line
    # The rib slopes by d(rib z) / d(arc length); its height is measured across that slope.
    arc_per_rad = np.hypot(a * np.sin(phi), b * np.cos(phi)) * (1.0 - centre_depth / np.sqrt(a * b))
    cos_tilt = 1.0 / np.hypot(1.0, drop * np.cos(phi) / (2.0 * arc_per_rad))  # (N,)
    n_h = dz * cos_tilt / half_height  # (D, N) across the rib, in semi-axes
    n_t = ((depth[rows, cols] - centre_depth) / half_thick)[None, :]
    rho_rib = np.maximum(np.sqrt(n_h * n_h + n_t * n_t), 1e-6)
    g_z = n_h * cos_tilt / (half_height * rho_rib)  # d rho_rib / d z
    g_r = n_t / (half_thick * rho_rib)  # d rho_rib / d depth (in-plane)
    g = np.maximum(np.hypot(g_z, g_r), 1e-6)
    ramp = grid.ramp((g_z / g) ** 2)
    weight = _fraction((rho_rib - 1.0) / g, ramp)
    vals = vol[:, rows, cols]
    vals += weight * (hu.astype(np.float32) - vals)
    vol[:, rows, cols] = vals


def _draw_spine(vol, chest: _Chest, grid: _Grid, levels: _Levels) -> None:
    """Vertebrae, one per level: cancellous bodies in a cortical shell, capped by endplates and
    separated by discs thicker in the middle than at the rim; a neural arch over the upper part
    of each level only (the foramina lie below it); transverse processes, a spinous process
    that slants down towards the back, and the necks of the ribs."""
    x, y, z, pixel_mm = grid.x, grid.y, grid.z, grid.pixel_mm
    yc = 0.5 * chest.body_b
    pitch, phase = levels.pitch_mm, levels.phase_mm
    sx, sy, cortex_mm, plate_mm = 16.0, 14.0, 1.5, 1.2

    def from_nearest(z_mm: float) -> np.ndarray:
        """(D, 1, 1) mm from the nearest level's z_mm (0 = a disc centre)."""
        dz = z - phase - z_mm
        return np.abs(dz - pitch * np.round(dz / pitch)).astype(np.float32)[:, None, None]

    ys, xs = _span(y, yc - sy, yc + sy), _span(x, -sx, sx)
    xb, yb = x[None, xs], y[ys, None]
    outer = _ellipse_2d(xb, yb, 0.0, yc, sx, sy, pixel_mm)  # (h, w)
    shell = 1.0 - _ellipse_2d(xb, yb, 0.0, yc, sx - cortex_mm, sy - cortex_mm, pixel_mm)
    rim = np.minimum((xb / sx) ** 2 + ((yb - yc) / sy) ** 2, 1.0)
    disc_half = 2.0 + 1.5 * (1.0 - rim)  # (h, w) mm: concave endplates
    to_disc = from_nearest(0.0)
    plate = _fraction(to_disc - disc_half - plate_mm, grid.slice_mm)  # (D, h, w)
    hu = HU_CANCELLOUS + (HU_BONE - HU_CANCELLOUS) * np.maximum(shell, plate)
    hu += _fraction(to_disc - disc_half, grid.slice_mm) * (HU_DISC - hu)
    block = vol[:, ys, xs]
    block += outer * (hu - block)

    arch_z = _fraction(from_nearest(0.5 * pitch + 2.0) - 8.0, grid.slice_mm)  # 16 mm per level
    for cx, cy, ex, ey, part_hu, along_z in ((0.0, yc + 22.0, 14.0, 10.0, HU_BONE, arch_z),
                                             (0.0, yc + 21.0, 7.0, 7.0, 20.0, 1.0)):  # canal
        ys, xs = _span(y, cy - ey, cy + ey), _span(x, cx - ex, cx + ex)
        w = _ellipse_2d(x[None, xs], y[ys, None], cx, cy, ex, ey, pixel_mm)  # (h, w)
        _paint(vol[:, ys, xs], w[None] * along_z, part_hu)

    near = np.arange(np.floor((z.min() - 30.0 - phase) / pitch),
                     np.ceil((z.max() + 30.0 - phase) / pitch))
    z_mid = phase + (near + 0.5) * pitch  # mid-heights of the vertebral bodies near the volume
    disc = pitch / 2  # the disc above, where the level's ribs join the spine
    processes = [  # (start x, y - yc, z - z_mid) -> (end x, y - yc, z - z_mid), radii at both
        ((0.0, 26.0, 3.0), (0.0, 40.0, -14.0), 3.5, 3.0),  # spinous
        *[((s * 9.0, 20.0, 5.0), (s * 30.0, 30.0, 7.0), 3.5, 3.0) for s in (-1, 1)],  # transverse
        *[((s * 14.0, 4.0, disc), (s * 28.0, 33.0, disc), 3.5, 3.5) for s in (-1, 1)],  # rib necks
    ]
    ends = [np.stack([np.full_like(z_mid, px), np.full_like(z_mid, yc + py), z_mid + pz], 1)
            for start, end, _, _ in processes for px, py, pz in (start, end)]
    radii = [np.full_like(z_mid, r) for *_, r0, r1 in processes for r in (r0, r1)]
    segs = _Segments(np.concatenate(ends[0::2]), np.concatenate(ends[1::2]),
                     np.concatenate(radii[0::2]), np.concatenate(radii[1::2]), HU_BONE)
    _draw_segments(vol, segs, grid, lung_only=False)


def _emboli(tubes: list[_Tube], arteries: list[_Segments], z: np.ndarray,
            rng: np.random.Generator) -> tuple[dict, list[np.ndarray | None]]:
    """Clots in 1-3 pulmonary arteries that cross the volume, from the trunk to segmental ones.

    Returns ({tube index: `_draw_tube`'s clot}, per set of artery pieces the clot radius per
    piece as a fraction of the vessel's, 0 for none, or None where no piece has one).
    """
    z_lo, z_hi = float(z.min()), float(z.max())
    candidates = [(None, i) for i, t in enumerate(tubes)
                  if t.pulmonary and t.z_hi - 5 > z_lo and t.z_lo + 5 < z_hi]
    for j, segs in enumerate(arteries):
        mid_z = (segs.p0[:, 2] + segs.p1[:, 2]) / 2
        segmental = (segs.r0 >= 2.0) & (mid_z > z_lo + 2) & (mid_z < z_hi - 2)
        candidates += [(j, int(i)) for i in np.nonzero(segmental)[0]]
    tube_clots, piece_clots = {}, [np.zeros(len(segs.r0)) for segs in arteries]
    n = min(len(candidates), int(rng.integers(1, 4)))
    for c in rng.choice(len(candidates), size=n, replace=False) if n else []:
        j, i = candidates[int(c)]
        if j is not None:
            piece_clots[j][i] = 0.6
            continue
        t = tubes[i]
        lo, hi = max(t.z_lo, z_lo), min(t.z_hi, z_hi)
        centre, length = rng.uniform(lo, hi), rng.uniform(8.0, 25.0)
        ang = rng.uniform(0, 2 * np.pi)
        tube_clots[i] = (centre - length / 2, centre + length / 2,
                         0.25 * np.cos(ang), 0.25 * np.sin(ang), 0.6)
    return tube_clots, [clots if clots.any() else None for clots in piece_clots]


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
    along z, a heart, contrast-filled great vessels, trachea and main bronchi, pulmonary artery
    and vein trees branching from the hila down to 1 mm vessels, vertebrae, ribs with costal
    cartilage, sternum and 4-10 lung nodules (3-8 mm,
    some part-solid) within the scanned range. With `emboli`, 1-3 pulmonary arteries that cross
    the volume hold a filling defect (~30 HU clot). Pixel centres are at
    (i - (size - 1) / 2) * pixel_mm, slice centres at ((n_slices - 1) / 2 - k) * slice_mm.
    """
    if n_slices < 1 or size < 2 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError("chest_phantom needs n_slices >= 1, size >= 2 and positive spacings")
    x = ((np.arange(size) - (size - 1) / 2) * pixel_mm).astype(np.float32)  # (W,) mm
    z = (((n_slices - 1) / 2 - np.arange(n_slices)) * slice_mm).astype(np.float32)  # head first
    grid = _Grid(x, x.copy(), z, pixel_mm, slice_mm)  # y (H,) mm, +y towards the back
    y = grid.y
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

    # Lungs, then the heart, which pushes into the left lung.
    organs = [(*e, HU_LUNG) for e in _lung_ellipses(chest, z)]
    organs.append((*_heart_ellipse(chest, z), HU_HEART))
    for cx, cy, sx, sy_, hu in organs:
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
        _paint(vol[zsl, ys, xs], w, hu)

    tubes = _vessels(chest, rng)
    arteries, veins = _pulmonary_trees(chest, np.random.default_rng(rng.integers(2**63)))
    nodules = _nodules(chest, z, rng)
    # Bone gets its own stream, drawn before the optional emboli, so emboli change nothing else.
    bone_rng = np.random.default_rng(rng.integers(2**63))
    central = _pulmonary_arteries(chest)
    tube_clots, (central_clots, artery_clots) = (
        _emboli(tubes, [central, arteries], z, rng) if emboli else ({}, [None, None]))

    # Clots only darken: whatever is drawn after one blends over it, and nothing is clipped to
    # lung after the arteries, whose clipping would otherwise see the clots of earlier vessels.
    _draw_segments(vol, veins, grid, lung_only=True)
    _draw_segments(vol, arteries, grid, lung_only=True, clot_frac=artery_clots)
    _draw_segments(vol, central, grid, lung_only=False, clot_frac=central_clots)
    for i, tube in enumerate(tubes):
        _draw_tube(vol, tube, grid, tube_clots.get(i))
    for airway in _airways(chest):  # wall, then the air inside
        _draw_segments(vol, airway, grid, lung_only=False)
    for nodule in nodules:
        _draw_nodule(vol, grid, nodule)
    levels = _Levels(bone_rng.uniform(25.0, 30.0), bone_rng.uniform(0.0, 30.0))
    _draw_spine(vol, chest, grid, levels)
    _draw_ribs(vol, chest, grid, levels, bone_rng)
    return vol
