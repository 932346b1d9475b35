"""Reading the uncompressed tar shards WebDataset writes: `read_samples`, the stream's first
stage (a shard's samples, grouped by key), and below it `tar_members`, a direct reader of the
regular files in order.

Python's tarfile (behind webdataset's `tar_file_expander`) costs about 50 us a member on
objects and checks these shards never need; this reader takes the 512-byte headers as they come
(POSIX ustar: name at 0, size at 124, checksum at 148, type at 156, prefix at 345) and yields
the same (name, bytes) pairs, checked byte for byte against tarfile in tests/test_tars.py.

Also read, as tarfile reads them: GNU long names (type L: the next member's name), pax extended
headers (type x: their `path` and `size` records; others, such as `mtime`, are ignored), the
base-256 size of GNU tar, and directories, links and devices (skipped: not regular files).
Refused, with an error naming the member: sparse files (S), global pax headers (g) that set a
path or size, and a header whose checksum is wrong or that ends early. tarfile would stop at a
damaged header as if the archive ended there; a shard that silently loses its last samples is
worse than one that stops the run.
"""

from __future__ import annotations

import json
import tarfile
from typing import BinaryIO, Iterator

import fsspec
from webdataset.tariterators import group_by_keys

from pipeline.errors import UserError

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file (tarfile's REGULAR_TYPES)
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"K")  # links, devices, dirs, FIFOs, long links
_NAME, _SIZE, _CHECKSUM, _TYPE, _MAGIC, _PREFIX = (slice(0, 100), slice(124, 136),
                                                   slice(148, 156), 156, slice(257, 263),
                                                   slice(345, 500))


class TarFormatError(ValueError):
    """A tar member this reader refuses or cannot parse; the message names it."""


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file of the tar `stream`, in archive order."""
    long_name, pax = None, {}
    while True:
        header = _read(stream, BLOCK, "a header")
        if header is None or not any(header):  # end of archive: end of data or a zero block
            return
        _check(header)
        kind, size = header[_TYPE:_TYPE + 1], _size(header)
        size = int(pax.get("size", size))
        data = _read(stream, size, "member data") if size else b""
        _read(stream, -size % BLOCK, "padding")
        if kind in (b"L", b"x", b"g"):
            if long_name is not None or pax:
                raise TarFormatError("two extended headers in a row: not a file a WebDataset "
                                     "writer makes")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data)
            elif {"path", "size"} & set(_pax_records(data)):
                raise TarFormatError("global pax header setting path or size: unsupported")
            continue
        name = pax.get("path", long_name) or _header_name(header, kind)
        long_name, pax = None, {}
        if kind in REGULAR and not name.endswith("/"):
            yield name, data
        elif kind not in SKIPPED and kind not in REGULAR:
            raise TarFormatError(f"member {name!r} of tar type {kind!r} (sparse or unknown): "
                                 "unsupported")


def _read(stream: BinaryIO, size: int, what: str) -> bytes | None:
    if not size:
        return b""
    data = stream.read(size)
    if what == "a header" and not data:
        return None
    if len(data) < size:
        raise TarFormatError(f"unexpected end of data in {what} ({len(data)} of {size} bytes)")
    return data


def _check(header: bytes) -> None:
    """The header checksum: the sum of its bytes with the checksum field read as spaces
    (tarfile also accepts the signed sum some old tars wrote)."""
    stored = _octal(header[_CHECKSUM], "checksum")
    unsigned = sum(header) - sum(header[_CHECKSUM]) + 8 * 32
    if stored != unsigned:
        signed = unsigned - 2 * sum(b for b in header if b >= 128)
        if stored != signed:
            name = header[_NAME].split(b"\0", 1)[0]
            raise TarFormatError(f"bad header checksum near member {name!r}")


def _size(header: bytes) -> int:
    field = header[_SIZE]
    if field[0] & 0x80:  # GNU base-256: big-endian with the top bit of the first byte set
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return _octal(field, "size")


def _octal(field: bytes, what: str) -> int:
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"header {what} field {field!r} is not octal") from None


def _header_name(header: bytes, kind: bytes) -> str:
    name = header[_NAME].split(b"\0", 1)[0]
    prefix = header[_PREFIX].split(b"\0", 1)[0]
    if prefix and header[_MAGIC] == b"ustar\0":  # POSIX ustar splits long names at a slash
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records of a pax extended header."""
    records, position = {}, 0
    try:
        while position < len(data) and data[position:position + 1] != b"\0":
            space = data.index(b" ", position)
            length = int(data[position:space])
            key, value = data[space + 1:position + length - 1].split(b"=", 1)
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            position += length
    except ValueError:
        raise TarFormatError(f"malformed pax header {data[:60]!r}") from None
    return records


class CorruptShardError(UserError):
    """A tar shard that cannot be read as prepare wrote it; the message names it."""


def corrupt_shard(url: str, what: str) -> str:
    return f"{url}: corrupt shard ({what[:200]}); rerun prepare (dvc repro prepare) to rewrite it"


def read_samples(sources):
    """Pipeline stage: the samples of each source ({"url", "segment"}: rows [start, stop) of one
    shard), its tar opened through fsspec (any local path or URL fsspec knows: file://, s3://,
    gs://, memory://, ...), read by `tar_members` (about 5x cheaper a member than tarfile:
    benchmarks/decode_steps.py) and grouped into samples by key, each with its parsed `meta`
    (json) and its `segment`. A shard that cannot be read stops the run naming it
    (CorruptShardError)."""
    for source in sources:
        segment, url = source["segment"], source["url"]
        try:
            with fsspec.open(url, "rb") as stream:
                files = ({"fname": name, "data": data, "__url__": url}
                         for name, data in tar_members(stream))
                for sample in group_by_keys(files):
                    meta = json.loads(sample["json"])
                    if segment.start <= meta["row"] < segment.stop:
                        sample["meta"], sample["segment"] = meta, segment
                        yield sample
        except FileNotFoundError:
            raise CorruptShardError(f"{url}: shard not found; rerun prepare (dvc repro "
                                    "prepare)") from None
        except (tarfile.TarError, ValueError, KeyError, TypeError, EOFError) as error:
            detail = error.args[0] if error.args else ""  # webdataset appends stream, url
            raise CorruptShardError(corrupt_shard(url, f"cannot be read: {type(error).__name__}: "
                                                  f"{detail}")) from None
