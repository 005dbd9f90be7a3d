"""The search page in a real browser (Debian's headless Chromium driven by Playwright): `/?q=...` shows thumbnails,
"More like this" changes the grid to the clicked image's neighbours, screenshots at desktop and phone width, and no
console error anywhere. Skipped, saying why, only where no Chromium is installed (`make browser` installs it)."""
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from bicascade.serve.app import AppConfig

from conftest import cli

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parents[1] / "work" / "screenshots"
# thumbnails load lazily: every one inside the viewport must have arrived (those below the fold need not have)
LOADED = ("[...document.querySelectorAll('#grid li img')].filter(i => i.getBoundingClientRect().top < innerHeight)"
          ".every(i => i.complete && i.naturalWidth > 0)")


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: `make browser` installs Debian's chromium (apt)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(tiny_db, in_process_server, tmp_path_factory):
    """The tiny world's database and six camera photos (EXIF: time, camera, GPS) indexed into a copy of it."""
    from test_images import camera_exif

    root = tmp_path_factory.mktemp("page")
    db = shutil.copytree(tiny_db, root / "db")
    (root / "photos").mkdir()
    cameras = [("Canon", "EOS R5", 24), ("Canon", "EOS R5", 26), ("Apple", "iPhone 15 Pro", 24),
               ("Apple", "iPhone 15 Pro", 27), ("FUJIFILM", "X100V", 25), ("FUJIFILM", "X100V", 28)]
    for n, (make, model, day) in enumerate(cameras):
        colour = ((n * 40) % 256, 255 - n * 30, 90 + n * 20)
        Image.new("RGB", (96, 64), colour).save(root / "photos" / f"trip_{n}.jpg", quality=90, exif=camera_exif(
            taken=f"2024:12:{day} 1{n}:30:00", make=make, model=model))
    cli("index", str(root / "photos"), "--db", str(db))
    return in_process_server(AppConfig(db=str(db)))


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)])
def test_the_page_searches_shows_thumbnails_and_more_like_this(url, browser, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    page.goto(f"{url}/?q=two+blue+squares")
    page.wait_for_function(f"document.querySelectorAll('#grid li img').length >= 10 && {LOADED}", timeout=60_000)
    assert page.input_value("#q") == "two blue squares"
    assert "GFLOPs" in page.inner_text("#cost")
    before = page.eval_on_selector_all("#grid li", "els => els.map(e => e.dataset.id)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"search-{width}.png"), full_page=False)
    target = before[3]
    page.click(f"#grid li[data-id='{target}'] button.more")
    page.wait_for_function(f"document.querySelector('#grid li') && "
                           f"document.querySelector('#grid li').dataset.id === '{target}'", timeout=60_000)
    after = page.eval_on_selector_all("#grid li", "els => els.map(e => e.dataset.id)")
    assert after[0] == target and after != before
    page.wait_for_function(LOADED, timeout=60_000)
    page.screenshot(path=str(SHOTS / f"more-like-this-{width}.png"), full_page=False)
    # the keyboard alone: "/" focuses the box, Enter searches
    page.keyboard.press("/")
    page.keyboard.type(" in a row")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#status').textContent === '' && "
                           "document.querySelectorAll('#grid li').length > 0", timeout=60_000)
    if width < 500:  # at phone width the grid has two columns and nothing overflows sideways
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.close()
    assert problems == []


def test_the_page_filters_by_camera_and_date_and_switches_to_hybrid(url, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#camera option').length === 4", timeout=60_000)
    assert page.eval_on_selector_all("#camera option", "os => os.map(o => o.textContent)") == [
        "any", "Apple iPhone 15 Pro (2)", "Canon EOS R5 (2)", "FUJIFILM X100V (2)"]
    page.select_option("#camera", "Canon EOS R5")
    page.fill("#q", "a photo of a trip")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#grid li').length === 2 && [...document.querySelectorAll("
                           "'#grid .captured')].every(e => e.textContent.includes('Canon EOS R5'))", timeout=60_000)
    captured = page.eval_on_selector_all("#grid .captured", "els => els.map(e => e.textContent)")
    assert sorted(c.split(" · ")[0] for c in captured) == ["2024-12-24 10:30", "2024-12-26 11:30"]
    assert all(c.endswith(" · Canon EOS R5 · 48.8584° N, 2.2945° E") for c in captured)
    page.fill("#after", "2024-12-25")  # the date inputs re-run the search as they change
    page.dispatch_event("#after", "change")
    page.wait_for_function("document.querySelectorAll('#grid li').length === 1 && "
                           "document.querySelector('#grid .captured').textContent.startsWith('2024-12-26 11:30')",
                           timeout=60_000)
    page.select_option("#camera", "")
    page.fill("#before", "2024-12-27")  # inclusive: the 27th is in, the 28th out
    page.dispatch_event("#before", "change")
    page.wait_for_function("document.querySelectorAll('#grid li').length === 3", timeout=60_000)  # 25th-27th
    page.wait_for_function(LOADED, timeout=60_000)
    time.sleep(1)  # any answer still on its way must not replace these (only the newest search's is shown)
    days = page.eval_on_selector_all("#grid .captured", "els => els.map(e => e.textContent.slice(0, 10))")
    assert sorted(days) == ["2024-12-25", "2024-12-26", "2024-12-27"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "filters-1280.png"), full_page=False)
    page.fill("#after", "")
    page.fill("#before", "")
    page.fill("#q", "trip_3")  # a file name: the keyword list finds it, hybrid fuses it with the cascade's
    page.select_option("#mode", "hybrid")
    first_word = ("[...document.querySelectorAll('#grid .captured')].find(e => e.textContent.includes('words #1 ') && "
                  "e.textContent.includes('2024'))")
    page.wait_for_function(first_word, timeout=60_000)
    assert page.evaluate(f"{first_word}.textContent").startswith("2024-12-27 13:30 · Apple iPhone 15 Pro · 48.8584° N")
    page.wait_for_function(LOADED, timeout=60_000)
    page.screenshot(path=str(SHOTS / "hybrid-1280.png"), full_page=False)
    page.close()
    assert problems == []


def test_errors_show_as_text_not_a_blank_page(url, browser):
    page = browser.new_page()
    page.goto(f"{url}/?q=" + "x" * 1001)  # too long: the server says why, the page shows it
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "query" in page.inner_text("#status")
    page.close()
