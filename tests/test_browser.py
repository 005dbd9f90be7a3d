"""The search page in a real browser (Debian's headless Chromium driven by Playwright): `/?q=...` shows thumbnails,
"More like this" changes the grid to the clicked image's neighbours, screenshots at desktop and phone width, and no
console error anywhere. Skipped, saying why, only where no Chromium is installed (`make browser` installs it)."""
import shutil
from pathlib import Path

import pytest

from bicascade.serve.app import AppConfig

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
def url(tiny_db, in_process_server):
    return in_process_server(AppConfig(db=tiny_db))


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


def test_errors_show_as_text_not_a_blank_page(url, browser):
    page = browser.new_page()
    page.goto(f"{url}/?q=" + "x" * 1001)  # too long: the server says why, the page shows it
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "query" in page.inner_text("#status")
    page.close()
