"""bicascade: cost-efficient text-to-image search with bi-encoder cascades.

    import bicascade

    photos = bicascade.open("work/db")  # a database `bicascade index` (or Collection.add) wrote
    for hit in photos.search("a red circle", k=3):
        print(f"{hit.score:.3f}  {hit.uri}")

`bicascade.open` gives a `bicascade.collection.Collection`; importing this package loads nothing heavy (no torch,
no Ray) until a collection searches or adds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from bicascade.collection import Collection

__version__ = "0.1.0"
__all__ = ["open", "__version__"]


def open(uri: str | Path, ladder: str | None = None, cutoffs: Sequence[int] | None = None,
         device: str | None = None) -> Collection:
    """The database at `uri` as a collection (see `bicascade.collection.Collection`)."""
    from bicascade.collection import Collection

    return Collection(uri, ladder, cutoffs, device)
