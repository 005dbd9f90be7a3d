"""The Python API: a database of indexed images as a collection you search, add to, remove from and check. The
`bicascade` command is a shell over it; the HTTP ingress answers with the same request and response types
(`bicascade.protocol`). Models load on the first search, Ray starts (or is joined) only by `add`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bicascade import query
from bicascade.errors import BadInputError, MissingWeightsError, NotIndexedError
from bicascade.levels import ResolvedLadder
from bicascade.protocol import SearchRequest, SearchResponse
from bicascade.storage import filters, tables, verify


class Collection:
    """A database (a folder or an `s3://` uri) and the ladder that serves it: the one it was indexed with, or
    `ladder`, which must share its level 0. Use it as a context manager, or call `close`, so the embeddings the
    searches computed are written back to the caches."""

    def __init__(self, uri: str | Path, ladder: str | None = None, cutoffs: Sequence[int] | None = None,
                 device: str | None = None) -> None:
        self.uri, self.ladder_name, self.cutoffs, self.device = str(uri), ladder, cutoffs, device
        self.db = tables.Database(self.uri)
        self._local: query.LocalSearch | None = None

    def __repr__(self) -> str:
        return f"Collection({self.uri!r})"

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def ladder(self) -> ResolvedLadder:
        """The ladder searches run on: its levels' models, fingerprints, dims and costs."""
        return self._local.ladder if self._local else query.open_ladder(self.db, self.ladder_name)

    def search(self, query_text: str | None = None, *, image: bytes | str | Path | None = None,
               image_id: str | None = None, k: int = 10, where: filters.Filter | dict[str, Any] | None = None,
               depth: int | None = None, offset: int = 0, min_score: float | None = None,
               dedup: float | None = None, mode: str = "semantic") -> SearchResponse:
        """The top `k` images for a text, a picture (bytes or a file's path) or an indexed image's id, through
        `depth` levels of the cascade (default all), among those `where` allows (the HTTP API's `where` object).
        `mode` "keyword" searches the text in captions, paths and metadata; "hybrid" fuses both lists."""
        if isinstance(image, (str, Path)):
            try:
                image = Path(image).read_bytes()
            except OSError as e:
                raise BadInputError(f"cannot read {image}: {e.strerror}") from None
        req = SearchRequest.of(query_text, image=image, image_id=image_id, k=k, where=where, depth=depth,
                               offset=offset, min_score=min_score, dedup=dedup, mode=mode)
        if self._local is None:
            self._local = query.LocalSearch(self.uri, self.ladder_name, self.cutoffs, device=self.device)
        return self._local.search(req)

    def add(self, source: str | Path, ladder: str | None = None, batch_size: int = 64):
        """Index the images of `source` (a folder, parquet, webdataset shards, an `s3://` prefix) that are not in
        yet, on the Ray cluster of RAY_ADDRESS or a local one; a new database needs `ladder`. The run's report."""
        from bicascade.pipelines.ingest import index

        report = index.run_index(str(source), self.uri, ladder, index.IndexConfig(batch_size=batch_size))
        if self._local is not None:
            self._local.corpus.refresh()
        return report

    def remove(self, ids: Sequence[str] = (), *, uri_prefix: str | None = None,
               where: filters.Filter | dict[str, Any] | None = None) -> dict[str, int]:
        """Remove images, by id, by the uri they were indexed from, or by a filter, from every table: the images,
        level 0 (and so the ANN index's results) and every level's cache. Table -> rows removed."""
        where = where if isinstance(where, filters.Filter) or where is None else filters.Filter.parse(where)
        if uri_prefix is not None:
            prefix = filters.Filter.parse({"uri_prefix": uri_prefix})
            where = replace(where, uri_prefix=uri_prefix) if where else prefix
        if not ids and where is None:
            raise BadInputError("remove what? give ids, uri_prefix or where")
        chosen = list(dict.fromkeys([*ids, *(filters.matching(self.db, where) if where else [])]))
        removed = self.db.remove_images(chosen)
        if self._local is not None:
            self._local.corpus.refresh()
        return removed

    def stats(self) -> dict:
        """Images in level 0, and how many of them each level holds (level 0 all; the others what they cached)."""
        infos = self.ladder.levels
        rows = self.db.count(tables.emb_table(infos[0].fingerprint))
        levels = []
        for info in infos:
            cached = self.db.count(tables.emb_table(info.fingerprint))
            levels.append({"model": info.name, "gflops": info.gflops, "cached": cached,
                           "coverage": cached / rows if rows else 0.0})
        return {"uri": self.uri, "ladder": self.ladder.name, "rows": rows, "levels": levels}

    def verify(self, repair: bool = False) -> verify.VerifyReport:
        """Check every table (with `repair`, fix what can be fixed, and report what is left)."""
        rows = self.db.recorded_ladder()
        if not rows:
            raise NotIndexedError(f"{self.uri} has not been indexed")
        problems = []
        try:
            query.recorded(self.db)
        except MissingWeightsError as e:
            problems.append(str(e))
        fingerprints = [r["fingerprint"] for r in rows]
        report = verify.verify(self.db, fingerprints, problems, repair=repair)
        if repair:  # what is left after the repairs, with what they did
            after = verify.verify(self.db, fingerprints, problems)
            for t, done in zip(after.tables, report.tables):
                t.repaired = done.repaired
            report = after
        return report

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
