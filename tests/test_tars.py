"""pipeline.stream.tars, the direct tar reader, against Python's tarfile and webdataset's expander:
the same (name, bytes) on the project's own shards and on archives in every format tarfile
writes; clear errors on what it refuses or cannot parse."""

import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_expander

from pipeline.data.shards import prepare_shards
from pipeline.stream.tars import TarFormatError, tar_members
from helpers import digits_data_params


def tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    """The reference: every regular member as tarfile reads it."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive
                if member.isreg()]


def direct_members(data: bytes) -> list[tuple[str, bytes]]:
    return list(tar_members(io.BytesIO(data)))


def test_the_projects_shards_read_as_tarfile_and_webdataset_read_them(tmp_path):
    manifest = prepare_shards(digits_data_params(), 0, tmp_path)
    files = [tmp_path / shard["file"] for split in manifest["splits"].values()
             for shard in split["shards"]]
    assert len(files) >= 8
    for path in files:
        data = path.read_bytes()
        found = direct_members(data)
        assert found == tarfile_members(data)
        expanded = [(m["fname"], m["data"]) for m in tar_file_expander(
            [{"url": str(path), "stream": io.BytesIO(data)}]) if m]  # {} marks a shard's end
        assert found == expanded
        assert len(found) == 3 * (len(found) // 3) > 0  # cls, jpg/png, json per sample


def archive(format: int, members: list[tuple[str, bytes | None]], **info) -> bytes:
    """A tar in `format` with regular files (bytes), directories (None) and a symlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            for key, value in info.items():
                setattr(member, key, value)
            if data is None:
                member.type = tarfile.DIRTYPE
                tar.addfile(member)
            else:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "a.json"
        tar.addfile(link)
    return buffer.getvalue()


LONG = "folder-" * 20 + "/sample.jpg"  # 151 characters: a ustar prefix, a GNU L or pax path
MEMBERS = [("a.json", b'{"row": 1}'), ("dir", None), ("dir/b.cls", b"7"),
           (LONG, bytes(range(256)) * 3), ("d\u00e9j\u00e0/c.txt", b""),
           ("x" * 120 + ".bin", b"\0" * 512), ("end.png", b"p" * 1000)]


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                    tarfile.PAX_FORMAT])
def test_every_tarfile_format_reads_as_tarfile_reads_it(format):
    ustar = format == tarfile.USTAR_FORMAT  # ascii names of <= 100 or split at a slash
    members = [(name, data) for name, data in MEMBERS
               if not ustar or (name.isascii() and (len(name) <= 100 or name == LONG))]
    data = archive(format, members)
    assert direct_members(data) == tarfile_members(data)
    assert [name for name, _ in direct_members(data)] == [
        name for name, content in members if content is not None]


def test_pax_mtime_records_as_webdataset_writers_make_them_are_read():
    data = archive(tarfile.PAX_FORMAT, MEMBERS[:3], mtime=1700000000.25)  # float: a pax record
    assert b"mtime=" in data
    assert direct_members(data) == tarfile_members(data)


def test_gnu_base_256_size():
    data = bytearray(archive(tarfile.GNU_FORMAT, [("a.bin", b"z" * 700)]))
    data[124:136] = bytes([0x80]) + (700).to_bytes(11, "big")  # the same size in base 256
    data[148:156] = b" " * 8
    data[148:155] = f"{sum(data[:512]):06o}\0".encode()
    assert direct_members(bytes(data)) == [("a.bin", b"z" * 700)] == tarfile_members(
        bytes(data))


def test_damaged_archives_are_refused_naming_the_problem():
    data = archive(tarfile.USTAR_FORMAT, [("a.json", b"1" * 600), ("b.json", b"2")])
    with pytest.raises(TarFormatError, match="unexpected end of data in member data"):
        direct_members(data[:700])
    with pytest.raises(TarFormatError, match="unexpected end of data in a header"):
        direct_members(data[:1024 + 512 + 100])
    bad = bytearray(data)
    bad[1024 + 512] ^= 1  # a bit of b.json's header name: tarfile would stop there silently
    with pytest.raises(TarFormatError, match="bad header checksum near member"):
        direct_members(bytes(bad))
    sparse = bytearray(data)
    sparse[156:157] = b"S"
    sparse[148:156] = b" " * 8
    sparse[148:155] = f"{sum(sparse[:512]):06o}\0".encode()
    with pytest.raises(TarFormatError, match="of tar type b'S'.*unsupported"):
        direct_members(bytes(sparse))
