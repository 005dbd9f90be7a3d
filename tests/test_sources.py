"""Listing a folder source: image files by extension in any case (a phone's `.JPG`, an iPhone's `.HEIC`), everything
else counted by extension so that `bicascade index` can say what it left out."""
from bicascade.pipelines.ingest import sources


def test_a_folder_lists_images_in_any_case_and_counts_what_it_leaves_out(tmp_path):
    for name in ("IMG_0001.JPG", "IMG_0002.HEIC", "scan.tiff", "sub/b.webp", "IMG_0001.AAE", "clip.MOV", "clip2.mov",
                 ".DS_Store", "README"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    src = sources.list_source(str(tmp_path))
    assert src.kind == "files"
    assert sorted(u.rsplit("/", 1)[-1] for u in src.units) == ["IMG_0001.JPG", "IMG_0002.HEIC", "b.webp", "scan.tiff"]
    assert src.ignored == {".mov": 2, ".aae": 1, "(none)": 1}  # hidden files are not the user's: not counted
