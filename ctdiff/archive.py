"""Safe iteration over the files of a case: a ZIP read in memory, or an unzipped folder.

Nothing is ever extracted to disk. ZIP members are checked against the central directory (path,
size, compression ratio) before any of them is inflated, so a hostile or broken archive fails
fast with a `CaseError`. Reasons name members by their index in the ZIP directory, never by
name: DICOM file names often hold patient names.
"""

from __future__ import annotations

import errno
import lzma
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import isal_zlib

from ctdiff.errors import CaseError

_MIB = 1 << 20
_GIB = 1 << 30
_DRIVE = re.compile(r"^[A-Za-z]:")
_MACOS_METADATA = "__MACOSX"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one case may unpack to; they guard memory against zip bombs."""

    max_member_bytes: int = 1 * _GIB  # one DICOM file; real CT slices are ~0.5 MB
    max_total_bytes: int = 32 * _GIB  # a whole case, uncompressed
    max_ratio: float = 200.0  # uncompressed / compressed; DICOM deflates ~2-10x
    ratio_min_bytes: int = 1 * _MIB  # small members may compress far better (padding, text)


def iter_members(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> Iterator[bytes]:
    """Yield the bytes of each regular file of a case, in a fixed order.

    A ZIP is read in memory; a folder is walked recursively in sorted order without following
    symlinks. Directories and macOS `__MACOSX/` metadata are skipped.
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_folder(path, limits)
    elif path.is_file():
        yield from _iter_zip(path, limits)
    else:
        raise CaseError("case not found")


def _is_unsafe(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or bool(_DRIVE.match(name)) or ".." in parts


def _is_macos_metadata(name: str) -> bool:
    return _MACOS_METADATA in re.split(r"[\\/]", name)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", _GIB), ("MiB", _MIB)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _check_sizes(sizes: list[tuple[int, int, int]], limits: ArchiveLimits) -> None:
    """Refuse a case from (index, uncompressed, compressed) sizes, before reading any member."""
    total = 0
    for index, size, compressed in sizes:
        if size > limits.max_member_bytes:
            raise CaseError(f"member #{index} too large ({_size(size)} uncompressed)")
        ratio = size / max(compressed, 1)
        if size > limits.ratio_min_bytes and ratio > limits.max_ratio:
            raise CaseError(f"zip bomb-like member #{index} (compression ratio {ratio:.0f})")
        total += size
        if total > limits.max_total_bytes:
            raise CaseError(f"case too large (over {_size(limits.max_total_bytes)} uncompressed)")


def _iter_zip(path: Path, limits: ArchiveLimits) -> Iterator[bytes]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise CaseError("corrupt zip") from exc
    except OSError as exc:
        _raise_if_transient(exc)
        raise CaseError("corrupt zip") from exc
    with zf:
        members: list[tuple[int, zipfile.ZipInfo]] = []
        for index, info in enumerate(zf.infolist()):
            if _is_unsafe(info.filename):
                raise CaseError(f"unsafe path in zip (member #{index})")
            if info.is_dir() or _is_macos_metadata(info.filename):
                continue
            if info.flag_bits & 0x1:
                raise CaseError(f"encrypted zip (member #{index})")
            members.append((index, info))
        _check_sizes([(n, i.file_size, i.compress_size) for n, i in members], limits)

        with open(path, "rb") as raw:
            for index, info in members:
                try:
                    # Bounded by the directory's file_size, which was checked above.
                    data = _read_member(zf, raw, info)
                except NotImplementedError as exc:
                    raise CaseError(f"unsupported zip compression in member #{index}") from exc
                except (zipfile.BadZipFile, zlib.error, isal_zlib.error, lzma.LZMAError, EOFError,
                        ValueError) as exc:
                    raise CaseError(f"corrupt zip: bad member #{index}") from exc
                except OSError as exc:
                    _raise_if_transient(exc)
                    raise CaseError(f"corrupt zip: bad member #{index}") from exc
                yield data


def _read_member(zf: zipfile.ZipFile, raw: BinaryIO, info: zipfile.ZipInfo) -> bytes:
    """One member's bytes, CRC-checked. Deflated and stored members (all DICOM ZIPs we have
    seen) are read in one piece and inflated with ISA-L, 2.5x faster than `zf.read` (1.5x from
    the inflater, the rest from zipfile's chunked reads); other methods go through zipfile."""
    if info.compress_type not in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED) or info.flag_bits & 0x20:
        return zf.read(info)  # bzip2, lzma, ...; compressed patched data (zipfile refuses it)
    raw.seek(info.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        raise zipfile.BadZipFile("truncated local header")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local header signature")
    if raw.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise zipfile.BadZipFile("file name in directory and local header differ")
    raw.seek(extra_length, os.SEEK_CUR)
    stored = raw.read(info.compress_size)
    if len(stored) != info.compress_size:
        raise zipfile.BadZipFile("truncated member")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        data = isal_zlib.decompress(stored, -15, max(info.file_size, 1))
    else:
        data = stored
    if len(data) != info.file_size or isal_zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile("bad CRC-32 or size")
    return data


def _raise_if_transient(exc: OSError) -> None:
    """Let I/O failures of the storage (not of the file's content) through, to be retried.

    zipfile reports a truncated archive as EINVAL (a seek before the start), and the bzip2
    decompressor a damaged member as an OSError without errno ("Invalid data stream"): both are
    the case's content. Anything else, such as EIO or ESTALE from a network filesystem, says
    nothing about the case itself.
    """
    if exc.errno is not None and exc.errno != errno.EINVAL:
        raise exc


def _iter_folder(root: Path, limits: ArchiveLimits) -> Iterator[bytes]:
    files: list[Path] = []
    sizes: list[tuple[int, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != _MACOS_METADATA)
        for name in sorted(filenames):
            file = Path(dirpath, name)
            st = file.lstat()
            if stat.S_ISREG(st.st_mode):  # symlinks and special files are not followed
                sizes.append((len(files), st.st_size, st.st_size))  # not compressed: ratio 1
                files.append(file)
    _check_sizes(sizes, limits)
    for file in files:
        yield file.read_bytes()
