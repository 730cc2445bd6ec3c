"""The tar bytes of our shards, written and parsed by hand so they are reproducible.

webdataset's TarWriter lets tarfile pick PAX headers and float mtimes, which makes
tars differ run to run (pipeline.md 2.2). Here every member is a regular file with a
GNU-format header (long names via GNU longname, which DALI and GNU tar read), mtime
and owner fixed, mode 0444, in the order given. Because we place every byte, member
offsets are known while writing and the DALI index needs no scan of the tar."""
from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Iterator

from common.keys import BadKeyError, check_key

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # 10240: archives end padded to whole records, like tar(1)
EXT_PATTERN = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")


class ShardError(ValueError):
    """A shard that is truncated, altered or not ours; the message names shard and offset."""


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def member_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}\.tar$")


def check_shard_name(name: str, where: str) -> str:
    """A shard file name from a manifest or index must stay inside the shards folder."""
    if not isinstance(name, str) or not SHARD_PATTERN.match(name):
        raise BadKeyError(f"unsafe shard name {name!r} in {where}: shard names must match "
                          f"{SHARD_PATTERN.pattern}; rebuild the shards with make shards")
    return name


def split_name(name: str) -> tuple[str, str]:
    """`KEY.ext.more` -> (KEY, 'ext.more'): first dot, as webdataset and DALI split."""
    key, dot, ext = name.partition(".")
    if not dot:
        return key, ""
    return key, ext


def check_member_name(name: str, where: str) -> tuple[str, str]:
    """Reject names that could escape a folder or mis-split a sample."""
    key, ext = split_name(name)
    check_key(key, where)
    if not EXT_PATTERN.match(ext):
        raise BadKeyError(f"unsafe member name {name!r} in {where}: the extension must match "
                          f"{EXT_PATTERN.pattern}; rebuild the shards with make shards")
    return key, ext


def pack_sample(key: str, members: list[tuple[str, bytes]], start: int, mtime: int
                ) -> tuple[bytes, list[dict]]:
    """Tar bytes of one sample starting at byte `start`, and each member's data offset."""
    check_key(key, "sample being packed")
    chunks, entries, offset = [], [], start
    for ext, data in members:
        name = f"{key}.{ext}"
        check_member_name(name, "sample being packed")
        header = member_header(name, len(data), mtime)
        offset += len(header)
        entries.append({"ext": ext, "offset": offset, "size": len(data)})
        pad = padding(len(data))
        chunks += [header, data, pad]
        offset += len(data) + len(pad)
    return b"".join(chunks), entries


def end_of_archive(size_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record."""
    end = size_so_far + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))


def iter_members(f: BinaryIO, shard: str) -> Iterator[tuple[str, int, int, int]]:
    """Walk a tar from the current position: (name, header offset, data offset, size).

    The header offset is that of the member's first header (its GNU long-name header
    when it has one). Every header's checksum and type are checked; anything we would
    not have written (links, folders, PAX headers, a short file) raises ShardError
    naming the offset."""
    offset = f.tell()
    long_name, long_start = None, None
    while True:
        block = f.read(BLOCK)
        if not block:
            raise ShardError(f"{shard}: truncated at offset {offset}: the file ends before "
                             "the end-of-archive blocks; rebuild it with make shards")
        if len(block) < BLOCK:
            raise ShardError(f"{shard}: truncated at offset {offset}: partial header of "
                             f"{len(block)} bytes; rebuild it with make shards")
        if block == b"\0" * BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except tarfile.HeaderError as e:
            raise ShardError(f"{shard}: bad tar header at offset {offset} ({e}); the shard "
                             "is corrupted or was altered: rebuild it with make shards") from e
        data_offset = offset + BLOCK
        if info.type == tarfile.GNUTYPE_LONGNAME:
            raw = f.read(info.size + len(padding(info.size)))
            if len(raw) < info.size:
                raise ShardError(f"{shard}: truncated at offset {data_offset} inside a long "
                                 "name; rebuild it with make shards")
            long_name, long_start = raw[:info.size].rstrip(b"\0").decode("utf-8"), offset
            offset = data_offset + len(raw)
            continue
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ShardError(f"{shard}: member {info.name!r} at offset {offset} is not a "
                             "regular file; our shards hold only files: rebuild with make shards")
        name = long_name if long_name is not None else info.name
        yield name, long_start if long_name is not None else offset, data_offset, info.size
        long_name = None
        offset = data_offset + info.size + len(padding(info.size))
        f.seek(offset)
