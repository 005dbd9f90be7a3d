"""Corpus sources: a folder, parquet or webdataset tar shards, local or on any pyarrow filesystem URI."""
from __future__ import annotations

import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bicascade.errors import BadInputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff", ".bmp", ".gif")
BYTES_COLUMNS = ("image", "bytes", "jpg", "png", "img", "image_bytes")
PATH_COLUMNS = ("uri", "path", "filepath", "file", "image_path", "url")
CAPTION_COLUMNS = ("caption", "text", "txt")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


READERS = 16  # files fetched at once: on object storage each GET waits tens of ms, and not for a CPU


def read_many(uris: Sequence[str]) -> list[bytes | Exception]:
    """Each file's bytes, fetched concurrently through one filesystem (the uris of one source); a failure is given
    in its place, not raised."""
    if not uris:
        return []
    fs, _ = filesystem(uris[0])

    def read(uri: str) -> bytes | Exception:
        try:
            with fs.open_input_file(uri.split("://", 1)[1] if "://" in uri else posixpath.abspath(uri)) as f:
                return f.read()
        except Exception as e:  # the caller records it against this file
            return e
    with ThreadPoolExecutor(min(READERS, len(uris))) as pool:
        return list(pool.map(read, uris))


@dataclass
class Source:
    """A listed source: its kind and the units the pipeline reads (image files, parquet files or tar shards)."""

    uri: str
    kind: str  # "files" | "parquet" | "tar"
    units: list[str]
    scheme: str  # prefix that turns a filesystem path back into a URI ("" for local paths)
    ignored: dict[str, int] = field(default_factory=dict)  # files of a folder that are no image, by extension
    modified: dict[str, float] = field(default_factory=dict)  # image file -> modification time (s), from the listing
    root: str = ""  # the listed path (a folder or one file), without the scheme


def list_source(uri: str) -> Source:
    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise BadInputError(f"source does not exist: {uri}")
    listed = [info] if info.type == pafs.FileType.File else \
        [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    mtimes = {f.path: f.mtime.timestamp() for f in listed if f.mtime is not None}
    files = sorted(f.path for f in listed)
    lower = [f.lower() for f in files]
    if any(f.endswith(".parquet") for f in lower):
        return Source(uri, "parquet", [f for f in files if f.lower().endswith(".parquet")], scheme)
    if any(f.endswith(".tar") for f in lower):
        return Source(uri, "tar", [f for f in files if f.lower().endswith(".tar")], scheme)
    others = Counter(posixpath.splitext(low)[1] or "(none)" for low in lower
                     if not low.endswith(IMAGE_EXTS) and not posixpath.basename(low).startswith("."))
    kept = [f for f, low in zip(files, lower) if low.endswith(IMAGE_EXTS)]
    return Source(uri, "files", kept, scheme, dict(others.most_common()), {f: mtimes[f] for f in kept if f in mtimes},
                  path)


def count_rows(source: Source) -> int | None:
    """Rows a source will yield, when its metadata says so cheaply (parquet); None for tar shards."""
    if source.kind == "files":
        return len(source.units)
    if source.kind == "parquet":
        fs, _ = filesystem(source.uri)
        return sum(pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in source.units)
    return None


def parquet_rows(source: Source, path: str) -> Iterator[dict[str, Any]]:
    """Rows of one parquet file as {uri, bytes, caption, meta}; relative paths resolve against the file's folder."""
    fs, _ = filesystem(source.uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    schema = pf.schema_arrow
    names = schema.names
    binary = {c for c in names if pa.types.is_binary(schema.field(c).type)
              or pa.types.is_large_binary(schema.field(c).type)}
    bytes_col = next((c for c in BYTES_COLUMNS if c in binary), None)
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    if bytes_col is None and path_col is None:
        raise BadInputError(f"{path}: no image column; expected bytes in one of {BYTES_COLUMNS} or paths in "
                            f"{PATH_COLUMNS}")
    cap_col = next((c for c in CAPTION_COLUMNS if c in names), None)
    rest = [c for c in names if c not in (bytes_col, path_col, cap_col)]
    base = posixpath.dirname(path)
    offset = 0
    for batch in pf.iter_batches(batch_size=1024):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            ref = cols[path_col][i] if path_col else None
            if ref and "://" not in ref and not posixpath.isabs(ref):
                ref = posixpath.join(base, ref)
            yield {"uri": source.scheme + ref if ref else f"{source.scheme}{path}#{offset + i}",
                   "bytes": cols[bytes_col][i] if bytes_col else None,
                   "caption": cols[cap_col][i] if cap_col else None,
                   "meta": json.dumps({c: cols[c][i] for c in rest}, default=str) if rest else None}
        offset += batch.num_rows


def tar_rows(source: Source, path: str) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset shard: members sharing a key form a sample (image + .txt/.json)."""
    fs, _ = filesystem(source.uri)
    samples: dict[str, dict[str, Any]] = {}
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = posixpath.splitext(member.name)
            data = tar.extractfile(member).read()
            sample = samples.setdefault(key, {"uri": f"{source.scheme}{path}#{key}", "bytes": None,
                                              "caption": None, "meta": None})
            if ext.lower() in IMAGE_EXTS:
                sample["bytes"] = data
            elif ext.lower() in (".txt", ".caption"):
                sample["caption"] = data.decode("utf-8", "replace").strip()
            elif ext.lower() == ".json":
                sample["meta"] = data.decode("utf-8", "replace")
    for sample in samples.values():
        if sample["bytes"] is None:
            sample["bytes"] = b""  # a sample without an image: reported as an error downstream
        yield sample
