"""The loader's tar reader against Python's tarfile: same members, and loud failures."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.tar_stream import TarStreamError, tar_members, tar_samples


def _tar(fmt: int, members: list[tuple[str, bytes]], extra=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if extra is not None:
            extra(tar)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBERS = [
    ("a.mp4", b"x" * 1000),
    ("a.json", b"{}"),
    ("empty.txt", b""),
    ("block.bin", bytes(range(256)) * 2),  # exactly one block
    ("d" * 60 + "/" + "n" * 80 + ".json", b"ustar prefix"),  # 141 chars: prefix + name
    ("x" * 150 + ".mp4", b"long name"),  # GNU: a long-name member; pax: a path record
    ("caf\u00e9-\u00fcnicode.json", b"utf-8 name"),
]


def _with_folder_and_link(tar: tarfile.TarFile) -> None:
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    tar.addfile(folder)
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "a.mp4"
    tar.addfile(link)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfiles(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) <= 141]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if m[0].isascii()]
    data = _tar(fmt, members, _with_folder_and_link)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(tar_members(io.BytesIO(data))) == expected == members


def test_a_stream_without_end_blocks_is_complete():
    data = _tar(tarfile.PAX_FORMAT, MEMBERS[:2])
    cut = data[: 3 * 512 + 1024]  # both members, no end-of-archive blocks
    assert [n for n, _ in tar_members(io.BytesIO(cut))] == ["a.mp4", "a.json"]
    assert list(tar_members(io.BytesIO(b""))) == []


@pytest.mark.parametrize("cut", [100, 512 + 300, 3 * 512 + 100])
def test_truncated_streams_fail(cut):
    data = _tar(tarfile.USTAR_FORMAT, MEMBERS[:2])
    with pytest.raises(TarStreamError, match="truncated"):
        list(tar_members(io.BytesIO(data[:cut])))


def test_corrupt_headers_fail():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, MEMBERS[:2]))
    data[3 * 512 + 5] ^= 0xFF  # the second member's name
    with pytest.raises(TarStreamError, match="bad header"):
        list(tar_members(io.BytesIO(bytes(data))))
    with pytest.raises(TarStreamError, match="bad header"):
        list(tar_members(io.BytesIO(b"not a tar at all" * 64)))


def test_samples_group_by_key_and_report_bad_shards(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(
        _tar(tarfile.PAX_FORMAT, [("k1.mp4", b"1"), ("k1.json", b"{}"), ("k2.mp4", b"2")])
    )
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[: 2 * 512 + 100])  # k1.mp4 whole, then cut in a header
    errors = []
    sources = [{"url": str(p)} for p in (bad, tmp_path / "missing.tar", good)]
    samples = list(tar_samples(sources, handler=lambda exc: errors.append(exc) or True))
    assert [(s["__key__"], s.get("mp4"), s["__url__"]) for s in samples] == [
        ("k1", b"1", str(bad)),  # kept: it was read before the cut
        ("k1", b"1", str(good)),
        ("k2", b"2", str(good)),
    ]
    assert samples[1]["json"] == b"{}"
    assert len(errors) == 2 and isinstance(errors[0], TarStreamError)
