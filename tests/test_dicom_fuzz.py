"""Fuzzing ctdiff.dicom.read_case: a damaged case reads exactly, or fails with a CaseError reason.

Valid synthetic cases (three transfer syntaxes, 32 x 32 px) are mutated a few hundred times,
seeded: iteration i uses `default_rng([SEED, i])`, so a failure named by its iteration replays
alone. Every read runs in a watchdog thread and must end within READ_LIMIT_S. Outcomes:

- exact: the same HU arrays and geometry as the intact case (the damage was harmless);
- rejected: a `CaseError` with a non-empty reason; any other exception fails the test;
- end slice dropped: a first or last slice that cannot be identified any more is ignored, and by
  design that cannot be told from a series one slice shorter (a damaged inner slice is a gap);
- values changed: a header value altered into another valid one (a digit of RescaleIntercept,
  BitsStored) is undetectable, allowed only for the kinds that can do that; the read must still
  be well formed (finite, strictly increasing positions, positive spacing).

After each mutant, the other intact cases are read again and must be unaffected; a second test
runs a batch through `preprocess.decode_case`, where a reader error becomes a quarantine entry.
"""

from __future__ import annotations

import io
import itertools
import struct
import threading
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dicom_fixtures
import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_series, dose_report, random_name, stored_volume, write_zip
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MPEG2MPML,
    RLELossless,
    generate_uid,
)

from ctdiff.cases import CaseRef
from ctdiff.dicom import CasePair, read_case
from ctdiff.errors import CaseError
from ctdiff.preprocess import align, decode_case
from ctdiff.store import CaseStore
from ctdiff.volume import Volume

SEED = 20261214
N_ITERATIONS = 300
READ_LIMIT_S = 5.0  # an intact case reads in ~20 ms; seconds mean a hang or a runaway loop
SHAPE = (32, 32)  # (H, W)
THICK_Z = np.arange(0.0, 20.1, 5.0)  # 5 slices: one lost inside still leaves 5 mm the median step
THIN_Z = np.arange(-2.5, 22.6, 2.5)  # 11 slices, covering the thick slabs (as align needs)

EXACT, REJECTED, END_DROPPED, CHANGED = "exact", "rejected", "end slice dropped", "values changed"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}  # explicit VRs with a 4-byte length field


@dataclass(frozen=True)
class BaseCase:
    """A valid case: its members (thick slices, thin slices, a dose report) and its intact read."""

    name: str
    syntax: str
    members: tuple[bytes, ...]
    n_thick: int
    n_thin: int
    path: Path  # the intact ZIP
    pair: CasePair

    def role(self, member: int) -> tuple[str, int] | None:
        """("thick" | "thin", index along z) of a slice member; None for the dose report."""
        if member < self.n_thick:
            return "thick", member
        if member < self.n_thick + self.n_thin:
            return "thin", member - self.n_thick
        return None


@dataclass(frozen=True)
class Mutant:
    target: int | None  # the member damaged, None for damage to the ZIP itself
    detail: str


def _make_base(root: Path, name: str, syntax: str, signed: bool, slope: float, intercept: float,
               rng: np.random.Generator) -> BaseCase:
    study = dicom_fixtures.generate_uid()
    kw = dict(study_uid=study, syntax=syntax, slope=slope, intercept=intercept)
    thick = ct_series(stored_volume(rng, (len(THICK_Z), *SHAPE), signed), THICK_Z, **kw)
    thin = ct_series(stored_volume(rng, (len(THIN_Z), *SHAPE), signed), THIN_Z, **kw)
    members = (*thick, *thin, dose_report(study))
    path = root / f"{name}.zip"
    named = [(random_name(rng), data) for data in members]
    with zipfile.ZipFile(path, "w") as zf:  # as write_zip, but the same bytes on every run
        for k in rng.permutation(len(named)):
            info = zipfile.ZipInfo(named[k][0], date_time=(2026, 12, 14, 0, 0, 0))
            zf.writestr(info, named[k][1], compress_type=zipfile.ZIP_DEFLATED)
    return BaseCase(name, syntax, members, len(thick), len(thin), path, read_case(path))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[BaseCase]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    rng = np.random.default_rng(SEED)
    numbers = itertools.count()
    with pytest.MonkeyPatch.context() as mp:
        # Seeded UIDs: their lengths move every byte offset, so a random UID would let the same
        # seed flip a different element on the next run. (pydicom's compress() makes one too.)
        for module in (dicom_fixtures, pydicom.pixels.utils):
            mp.setattr(module, "generate_uid",
                       lambda: generate_uid(entropy_srcs=[str(SEED), str(next(numbers))]))
        return [
            _make_base(root, "explicit", ExplicitVRLittleEndian, False, 1.0, -1024.0, rng),
            _make_base(root, "implicit", ImplicitVRLittleEndian, True, 1.0, 0.0, rng),
            _make_base(root, "rle", RLELossless, False, 2.0, -2048.0, rng),
        ]


# ---------------------------------------------------------------------- byte-level helpers


@dataclass(frozen=True)
class _Element:
    tag: int
    start: int  # offset of the tag
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes
    length: int


def _elements(data: bytes, implicit: bool) -> list[_Element]:
    """Top-level elements of a little-endian DICOM file (file meta, then dataset), in order."""
    elements, pos = [], 132  # after the preamble and "DICM"
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group == 2 or not implicit:
            at, size = (pos + 8, 4) if data[pos + 4: pos + 6] in _LONG_VRS else (pos + 6, 2)
        else:
            at, size = pos + 4, 4
        length = int.from_bytes(data[at: at + size], "little")
        elements.append(_Element((group << 16) | elem, pos, at, size, length))
        if length == 0xFFFFFFFF:  # encapsulated pixel data, the last element of these files
            break
        pos = at + size + length
    return elements


def _header_end(data: bytes, syntax: str) -> int:
    """Offset of the PixelData tag: everything before it is header."""
    pixel = [e for e in _elements(data, syntax == ImplicitVRLittleEndian) if e.tag == 0x7FE00010]
    return pixel[0].start if pixel else len(data)


def _edit(data: bytes, change: Callable[[pydicom.Dataset], None]) -> bytes:
    """Re-encode a member after changing its dataset (a well-formed file with wrong content)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _relabel(data: bytes, syntax: str) -> bytes:
    """The same dataset bytes under another TransferSyntaxUID (its element and group length)."""
    element = next(e for e in _elements(data, implicit=False) if e.tag == 0x00020010)
    value = syntax.encode() + b"\0" * (len(syntax) % 2)  # UI values are padded to even length
    group_length = int.from_bytes(data[140:144], "little") + len(value) - element.length
    return (data[:140] + group_length.to_bytes(4, "little") + data[144: element.length_at]
            + len(value).to_bytes(2, "little") + value
            + data[element.length_at + 2 + element.length:])


def _slice_member(rng: np.random.Generator, base: BaseCase) -> int:
    return int(rng.integers(0, base.n_thick + base.n_thin))


def _zip_members(rng, base: BaseCase, path: Path, target: int, data: bytes) -> None:
    members = list(base.members)
    members[target] = data
    write_zip(path, members, rng)


# ---------------------------------------------------------------------- mutations
# Each writes the damaged case's ZIP to `path` and says what it did.


def _flip_bytes(rng, base, path, target: int, low: int, high: int, most: int) -> Mutant:
    """1 to `most` bytes of member `target` in [low, high) XOR-ed with random non-zero values."""
    data = bytearray(base.members[target])
    offsets = rng.integers(low, high, size=int(rng.integers(1, most)))
    for offset in offsets:
        data[offset] ^= int(rng.integers(1, 256))
    _zip_members(rng, base, path, target, bytes(data))
    return Mutant(target, f"member {target}, bytes {sorted(offsets.tolist())}")


def _flip_header_bytes(rng, base, path) -> Mutant:
    target = int(rng.integers(0, len(base.members)))
    return _flip_bytes(rng, base, path, target, 0, _header_end(base.members[target], base.syntax), most=5)


def _flip_pixel_bytes(rng, base, path) -> Mutant:
    """Bytes flipped in a slice's pixel data: wrong HU if uncompressed, a damaged RLE stream."""
    target = _slice_member(rng, base)
    data = base.members[target]
    return _flip_bytes(rng, base, path, target, _header_end(data, base.syntax), len(data), most=20)


def _wrong_element_length(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)
    data = bytearray(base.members[target])
    elements = _elements(bytes(data), base.syntax == ImplicitVRLittleEndian)
    element = elements[int(rng.integers(0, len(elements)))]
    largest = (1 << 8 * element.length_size) - 1
    length = int(rng.choice([element.length + int(rng.choice([-4, -2, -1, 1, 2, 4, 100])), 0,
                             largest, int(rng.integers(0, largest))]))
    length = min(max(length, 0), largest)
    data[element.length_at: element.length_at + element.length_size] = length.to_bytes(
        element.length_size, "little")
    _zip_members(rng, base, path, target, bytes(data))
    return Mutant(target, f"member {target}, tag {element.tag:08X} length {element.length}"
                          f" -> {length}")


def _truncated_file(rng, base, path) -> Mutant:
    target = int(rng.integers(0, len(base.members)))
    cut = int(rng.integers(0, len(base.members[target])))
    _zip_members(rng, base, path, target, base.members[target][:cut])
    return Mutant(target, f"member {target} cut at byte {cut}")


def _truncated_zip(rng, base, path) -> Mutant:
    data = base.path.read_bytes()
    cut = int(rng.integers(0, len(data)))
    path.write_bytes(data[:cut])
    return Mutant(None, f"ZIP cut at byte {cut} of {len(data)}")


def _zip_byte_flips(rng, base, path) -> Mutant:
    """Bytes flipped anywhere in the ZIP: headers, directory, compressed data."""
    data = bytearray(base.path.read_bytes())
    offsets = rng.integers(0, len(data), size=int(rng.integers(1, 5)))
    for offset in offsets:
        data[offset] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return Mutant(None, f"ZIP bytes {sorted(offsets.tolist())} of {len(data)}")


def _truncated_zip_member(rng, base, path) -> Mutant:
    """A member whose compressed stream is shorter than it should be (both headers agree)."""
    write_zip(path, list(base.members), rng, stored=bool(rng.integers(0, 2)))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    index = int(rng.integers(0, len(infos)))
    info = infos[index]
    size = int(rng.integers(0, info.compress_size))
    central = data.find(b"PK\x01\x02")
    for _ in range(index):  # central directory entries, in directory order
        central = data.find(b"PK\x01\x02", central + 4)
    for at in (info.header_offset + 18, central + 20):  # compressed size: local, central
        data[at: at + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return Mutant(None, f"ZIP member #{index} ({info.compress_type=}) cut to {size} bytes"
                        f" of {info.compress_size}")


_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
             DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless,
             RLELossless, MPEG2MPML, "1.2.3.4", "", "not a uid"]


def _transfer_syntax(rng, base, path) -> Mutant:
    """One slice, or every slice of the case, relabelled with another (or a bogus) syntax."""
    syntax = str(rng.choice(_SYNTAXES))
    if rng.integers(0, 2):
        target = _slice_member(rng, base)
        _zip_members(rng, base, path, target, _relabel(base.members[target], syntax))
        return Mutant(target, f"member {target} labelled {syntax!r}")
    n_slices = base.n_thick + base.n_thin
    members = [_relabel(m, syntax) if k < n_slices else m for k, m in enumerate(base.members)]
    write_zip(path, members, rng)
    return Mutant(None, f"every slice labelled {syntax!r}")


def _rescale_tags(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)
    change = str(rng.choice(["no RescaleSlope", "no RescaleIntercept", "no rescale",
                             "empty RescaleIntercept", "RescaleSlope nan", "RescaleIntercept inf",
                             "RescaleSlope 0"]))

    def edit(ds: pydicom.Dataset) -> None:
        if change in ("no RescaleSlope", "no rescale"):
            del ds.RescaleSlope
        if change in ("no RescaleIntercept", "no rescale"):
            del ds.RescaleIntercept
        if change == "empty RescaleIntercept":
            ds.RescaleIntercept = ""
        if change in ("RescaleSlope nan", "RescaleSlope 0"):
            ds.RescaleSlope = change.split()[1]
        if change == "RescaleIntercept inf":
            ds.RescaleIntercept = "inf"

    _zip_members(rng, base, path, target, _edit(base.members[target], edit))
    return Mutant(target, f"member {target}: {change}")


def _non_finite_position(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)
    axis, value = int(rng.integers(0, 3)), str(rng.choice(["nan", "inf", "-inf"]))

    def edit(ds: pydicom.Dataset) -> None:
        ipp = [str(v) for v in ds.ImagePositionPatient]
        ipp[axis] = value
        ds.ImagePositionPatient = ipp

    _zip_members(rng, base, path, target, _edit(base.members[target], edit))
    return Mutant(target, f"member {target}: ImagePositionPatient[{axis}] = {value}")


def _missing_pixel_data(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)

    def edit(ds: pydicom.Dataset) -> None:
        del ds.PixelData

    _zip_members(rng, base, path, target, _edit(base.members[target], edit))
    return Mutant(target, f"member {target} without PixelData")


def _wrong_rows_columns(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)
    key, value = str(rng.choice(["Rows", "Columns"])), int(rng.choice([0, 1, 16, 31, 33, 64,
                                                                        65535]))
    _zip_members(rng, base, path, target,
                 _edit(base.members[target], lambda ds: setattr(ds, key, value)))
    return Mutant(target, f"member {target}: {key} = {value}")


_PIXEL_MODULE_VALUES = {
    "BitsAllocated": [None, 0, 1, 8, 12, 32], "BitsStored": [None, 0, 8, 17], "HighBit": [None, 3],
    "PixelRepresentation": [None, 0, 1, 2], "SamplesPerPixel": [None, 0, 3],
    "PhotometricInterpretation": [None, "MONOCHROME1", "RGB", "YBR_FULL"],
}  # None: the element deleted


def _pixel_module(rng, base, path) -> Mutant:
    target = _slice_member(rng, base)
    key = str(rng.choice(list(_PIXEL_MODULE_VALUES)))
    value = _PIXEL_MODULE_VALUES[key][int(rng.integers(0, len(_PIXEL_MODULE_VALUES[key])))]

    def edit(ds: pydicom.Dataset) -> None:
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)

    _zip_members(rng, base, path, target, _edit(base.members[target], edit))
    return Mutant(target, f"member {target}: {key} = {value}")


def _duplicate_slice(rng, base, path) -> Mutant:
    """A slice moved onto its neighbour's position, or a second copy of a slice file."""
    target = _slice_member(rng, base)
    role, k = base.role(target)  # type: ignore[misc]
    if rng.integers(0, 2):
        members = [*base.members, base.members[target]]
        write_zip(path, members, rng)
        return Mutant(None, f"member {target} twice")
    z = (THICK_Z if role == "thick" else THIN_Z)[k + 1 if k == 0 else k - 1]

    def edit(ds: pydicom.Dataset) -> None:
        ds.ImagePositionPatient = [*[str(v) for v in ds.ImagePositionPatient[:2]], f"{z:.4f}"]

    _zip_members(rng, base, path, target, _edit(base.members[target], edit))
    return Mutant(target, f"member {target} moved to its neighbour's z = {z}")


MUTATIONS: dict[str, Callable[[np.random.Generator, BaseCase, Path], Mutant]] = {
    "header byte flips": _flip_header_bytes,
    "pixel data byte flips": _flip_pixel_bytes,
    "wrong element length": _wrong_element_length,
    "truncated file": _truncated_file,
    "truncated zip": _truncated_zip,
    "truncated zip member": _truncated_zip_member,
    "zip byte flips": _zip_byte_flips,
    "transfer syntax": _transfer_syntax,
    "rescale tags": _rescale_tags,
    "non-finite position": _non_finite_position,
    "missing pixel data": _missing_pixel_data,
    "wrong rows/columns": _wrong_rows_columns,
    "pixel module": _pixel_module,
    "duplicate slice": _duplicate_slice,
}
ALLOWED = {
    "header byte flips": {EXACT, REJECTED, END_DROPPED, CHANGED},
    "pixel data byte flips": {EXACT, REJECTED, CHANGED},  # no checksum on native pixels
    "wrong element length": {EXACT, REJECTED, END_DROPPED},
    "truncated file": {EXACT, REJECTED, END_DROPPED},
    "truncated zip": {REJECTED},
    "truncated zip member": {REJECTED},
    "zip byte flips": {EXACT, REJECTED},
    "transfer syntax": {EXACT, REJECTED, END_DROPPED},
    "rescale tags": {REJECTED},
    "non-finite position": {REJECTED},
    "missing pixel data": {REJECTED},
    "wrong rows/columns": {REJECTED, END_DROPPED},
    "pixel module": {EXACT, REJECTED, END_DROPPED, CHANGED},  # SamplesPerPixel 3: not CT
    "duplicate slice": {REJECTED},
}


# ---------------------------------------------------------------------- reading and judging


def _read_bounded(path: Path) -> tuple[CasePair | BaseException | None, float]:
    """read_case in a watchdog thread: (its result or exception, seconds); None if it hangs."""
    box: list[CasePair | BaseException] = []

    def run() -> None:
        try:
            box.append(read_case(path))
        except BaseException as exc:  # noqa: BLE001 - judged by the caller, type included
            box.append(exc)

    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)  # daemon: a hung read cannot block exit
    worker.start()
    worker.join(READ_LIMIT_S)
    return (box[0] if box else None), time.perf_counter() - start


def _same(a: Volume, b: Volume) -> bool:
    return (np.array_equal(a.hu, b.hu) and a.hu.dtype == b.hu.dtype
            and np.array_equal(a.z_mm, b.z_mm) and a.spacing_mm == b.spacing_mm
            and a.orientation == b.orientation and a.origin_mm == b.origin_mm)


def _without_end(volume: Volume, first: bool) -> Volume:
    keep = slice(1, None) if first else slice(None, -1)
    normal = np.cross(volume.orientation[:3], volume.orientation[3:])
    shift = volume.z_mm[1] - volume.z_mm[0] if first else 0.0
    return Volume(hu=volume.hu[keep], spacing_mm=volume.spacing_mm, z_mm=volume.z_mm[keep],
                  orientation=volume.orientation,
                  origin_mm=tuple(float(c) for c in np.asarray(volume.origin_mm) + normal * shift))


def _assert_well_formed(pair: CasePair, where: str) -> None:
    for role, v in (("thick", pair.thick), ("thin", pair.thin)):
        assert v.hu.dtype == np.int16 and v.hu.ndim == 3, f"{where}: {role} hu {v.hu.dtype}"
        assert v.hu.shape[0] == len(v.z_mm) >= 2, f"{where}: {role} {v.hu.shape} {len(v.z_mm)}"
        assert np.all(np.isfinite(v.z_mm)) and np.all(np.diff(v.z_mm) > 0), f"{where}: {role} z"
        assert all(np.isfinite(v.spacing_mm)) and min(v.spacing_mm) > 0, f"{where}: {role} spacing"
        assert all(np.isfinite(v.origin_mm + v.orientation)), f"{where}: {role} origin/orientation"


def _judge(result: CasePair | BaseException | None, base: BaseCase, mutant: Mutant,
           where: str) -> tuple[str, str | None]:
    """The outcome of one read, and the reason when rejected."""
    if isinstance(result, CaseError):
        assert result.reason.strip(), f"{where}: CaseError without a reason"
        return REJECTED, result.reason
    if isinstance(result, BaseException):
        raise AssertionError(f"{where}: {type(result).__name__}: {result}") from result
    assert result is not None
    _assert_well_formed(result, where)
    intact = base.pair
    if _same(result.thick, intact.thick) and _same(result.thin, intact.thin):
        return EXACT, None
    role = base.role(mutant.target) if mutant.target is not None else None
    if role is not None:
        name, k = role
        n = len(getattr(intact, name).z_mm)
        other = "thin" if name == "thick" else "thick"
        if k in (0, n - 1) and _same(getattr(result, other), getattr(intact, other)):
            dropped = _without_end(getattr(intact, name), first=k == 0)
            got = getattr(result, name)
            if (np.array_equal(got.hu, dropped.hu) and np.array_equal(got.z_mm, dropped.z_mm)
                    and np.allclose(got.origin_mm, dropped.origin_mm, rtol=0, atol=1e-9)):
                return END_DROPPED, None
    return CHANGED, None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every damaged header
@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy on NaN/overflow: a reader bug
def test_mutated_cases_read_exactly_or_fail_with_a_reason(bases, tmp_path):
    counts: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    slowest = 0.0
    kinds = list(MUTATIONS)
    for iteration in range(N_ITERATIONS):
        rng = np.random.default_rng([SEED, iteration])
        kind = kinds[iteration % len(kinds)]
        base = bases[int(rng.integers(0, len(bases)))]
        path = tmp_path / "mutant.zip"
        mutant = MUTATIONS[kind](rng, base, path)
        where = (f"seed {SEED}, iteration {iteration}: {kind} on case {base.name!r}"
                 f" ({mutant.detail})")

        result, seconds = _read_bounded(path)
        assert result is not None, f"{where}: read still running after {READ_LIMIT_S} s"
        assert seconds < READ_LIMIT_S, f"{where}: read took {seconds:.1f} s"
        slowest = max(slowest, seconds)
        outcome, reason = _judge(result, base, mutant, where)
        assert outcome in ALLOWED[kind], f"{where}: {outcome} not expected of {kind}"
        counts[kind][outcome] += 1
        if reason:
            reasons[kind][reason] += 1

        for other in bases:  # a damaged case must not change how any other case reads
            if other is not base:
                got, _ = _read_bounded(other.path)
                assert isinstance(got, CasePair), f"{where}: intact {other.name!r} -> {got!r}"
                assert _same(got.thick, other.pair.thick) and _same(got.thin, other.pair.thin), (
                    f"{where}: intact case {other.name!r} read differently afterwards")

    outcomes = [EXACT, REJECTED, END_DROPPED, CHANGED]
    print(f"\n{'mutation':<22}" + "".join(f"{o:>19}" for o in outcomes))
    for kind in kinds:
        print(f"{kind:<22}" + "".join(f"{counts[kind][o]:>19}" for o in outcomes))
    print(f"slowest read {slowest:.3f} s; most frequent reasons:")
    for kind in kinds:
        common = ", ".join(f"{r!r} x{n}" for r, n in reasons[kind].most_common(3))
        print(f"  {kind}: {common}")
    totals = sum(counts.values(), Counter())
    assert totals[EXACT] > 0 and totals[REJECTED] > 0, totals  # neither outcome is vacuous
    assert all(counts[kind][REJECTED] > 0 for kind in kinds if kind != "header byte flips"), counts


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_preprocessing_quarantines_each_damaged_case_alone(bases, tmp_path):
    """One mutant of every kind in a batch with the intact cases, through `decode_case`: each
    mutant is stored or quarantined exactly as reading it alone says, the intact ones intact."""
    store = CaseStore(tmp_path / "store.zarr")
    store.create()
    refs, expected = [], {}
    for n, kind in enumerate(MUTATIONS):
        rng = np.random.default_rng([SEED, N_ITERATIONS + n])
        path = tmp_path / f"{n:02d}.zip"
        MUTATIONS[kind](rng, bases[n % len(bases)], path)
        try:
            pair = read_case(path)
            align(pair.thick, pair.thin)
            expected[path.stem] = None
        except CaseError as error:
            expected[path.stem] = error.reason
        refs.append(CaseRef(id=path.stem, path=str(path), category=kind))
    for base in bases:
        refs.append(CaseRef(id=base.name, path=str(base.path), category="intact"))
        expected[base.name] = None
    rng = np.random.default_rng(SEED)
    for ref in (refs[k] for k in rng.permutation(len(refs))):  # intact ones among the mutants
        summary = decode_case(ref, store)
        reason = expected[ref.id]
        assert summary["status"] == ("ok" if reason is None else "quarantined"), (ref, summary)
        assert summary["reason"] == reason, (ref, summary)
    assert any(expected.values()), expected  # the batch did hold quarantined cases
    for base in bases:
        thick, thin = align(base.pair.thick, base.pair.thin)
        for kind, volume in (("thick", thick), ("thin", thin)):
            stored = store.read_native(base.name, kind)
            np.testing.assert_array_equal(stored.hu, volume.hu)
            np.testing.assert_array_equal(stored.z_mm, volume.z_mm)
            assert stored.spacing_mm == pytest.approx(volume.spacing_mm)
            assert stored.origin_mm == pytest.approx(volume.origin_mm)
