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


def test_files_are_fetched_concurrently_in_order_and_a_failure_stays_in_its_place(tmp_path, monkeypatch):
    """Object storage answers each GET in tens of ms: a batch's files are fetched at once (here every read waits
    0.2 s; one after another, 8 would take 1.6 s)."""
    import threading
    import time

    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    uris = [str(tmp_path / f"{i}.jpg") for i in range(8)] + [str(tmp_path / "gone.jpg")]
    local, _ = sources.filesystem(uris[0])
    at_once, lock = [0, 0], threading.Lock()

    class Slow:
        def open_input_file(self, path):
            with lock:
                at_once[0] += 1
                at_once[1] = max(at_once)
            time.sleep(0.2)
            with lock:
                at_once[0] -= 1
            return local.open_input_file(path)
    monkeypatch.setattr(sources, "filesystem", lambda uri: (Slow(), uri))
    got = sources.read_many(uris)
    assert got[:8] == [bytes([i]) * 10 for i in range(8)] and isinstance(got[8], FileNotFoundError)
    assert at_once[1] >= 8  # every read in flight together
