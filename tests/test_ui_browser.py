"""Browser tests of the web page (ui/) against the real served application.

A headless Chromium (Debian's /usr/bin/chromium, or $CHROMIUM_PATH) drives the page served at
`serve_base_url` with the real index. Fixtures `serve_base_url`, `indexed_images` and
`artifact_dir` come from tests/conftest.py. Screenshots of each state go to
artifact_dir/screenshots/ui-*.png.

Waiting is always Playwright's auto-waiting (expect(...), wait_for_function), never sleeps.
Predicates for wait_for_function are written as functions ("() => ..."): Playwright polls bare
expressions with eval(), which the page's Content-Security-Policy forbids.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The first search may wait for model replicas to warm up.
TIMEOUT_MS = 60_000
DESKTOP = {"width": 1280, "height": 1000}
PHONE = {"width": 390, "height": 844}

expect.set_options(timeout=TIMEOUT_MS)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Browser:
    # A missing browser is a broken test setup, not a reason to skip: scripts/test.sh installs it.
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def api_info(serve_base_url: str) -> dict:
    """GET /info, read outside the browser so it does not show in the page's request log."""
    with urllib.request.urlopen(serve_base_url + "/info", timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def screenshots(artifact_dir: Path) -> Path:
    folder = Path(artifact_dir) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Ui:
    page: Page
    base_url: str
    requests: list[Request] = field(default_factory=list)
    # Uncaught exceptions and console errors (CSP violations are reported there).
    problems: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    def rows(self):
        return self.page.locator(".result-row")

    def upload(self, *paths: Path) -> None:
        self.page.locator("input[type=file]#file-input").set_input_files([str(p) for p in paths])

    def search_requests(self) -> list[Request]:
        # (Under a route prefix too: the writes app is served at /pagewrites/.)
        return [r for r in self.requests if r.method == "POST" and urlsplit(r.url).path.endswith("/search")]


def open_page(browser: Browser, base_url: str, viewport: dict, init_script: str | None = None):
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(TIMEOUT_MS)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    ui = Ui(page=page, base_url=base_url)
    # On the context, so requests of popups/new tabs are recorded too.
    context.on("request", lambda request: ui.requests.append(request))
    page.on("pageerror", lambda exc: ui.problems.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and ui.problems.append(f"console: {msg.text}"))
    page.goto(base_url + "/")
    # /info has answered once the header no longer shows its loading text.
    expect(page.locator("#index-info")).not_to_contain_text("Loading")
    return context, ui


@pytest.fixture
def ui(browser: Browser, serve_base_url: str):
    context, ui = open_page(browser, serve_base_url, DESKTOP)
    yield ui
    context.close()


@pytest.fixture
def phone_ui(browser: Browser, serve_base_url: str):
    context, ui = open_page(browser, serve_base_url, PHONE)
    yield ui
    context.close()


@pytest.fixture
def text_named_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "holiday-notes.jpg"
    path.write_text("Not a picture at all, just some text with a .jpg name.\n" * 20)
    return path


# ---------------------------------------------------------------- helpers


def expected_matches(api_info: dict, k: int | None = None) -> int:
    return min(k if k is not None else api_info["default_k"], api_info["index_size"])


def wait_thumbnails_loaded(ui: Ui, count: int) -> None:
    """All result thumbnails exist, and each one actually decoded (naturalWidth > 0)."""
    images = ui.page.locator(".result-row .match img")
    expect(images).to_have_count(count)
    # Thumbnails are lazy-loaded: bring each into view so the browser fetches it.
    for i in range(count):
        images.nth(i).scroll_into_view_if_needed()
    ui.page.wait_for_function(
        """(n) => {
            const images = [...document.querySelectorAll('.result-row .match img')];
            return images.length === n && images.every((img) => img.complete && img.naturalWidth > 0);
        }""",
        arg=count,
    )


def row_scores(row) -> list[float]:
    scores = row.locator(".match .score")
    for i in range(scores.count()):
        expect(scores.nth(i)).to_be_visible()
        expect(scores.nth(i)).to_have_text(re.compile(r"^-?\d+\.\d+$"))
    return [float(text) for text in scores.all_inner_texts()]


def assert_rows_have_results(ui: Ui, names: list[str], per_row: int) -> None:
    rows = ui.rows()
    expect(rows).to_have_count(len(names))
    for i, name in enumerate(names):
        row = rows.nth(i)
        expect(row.locator(".query-name")).to_have_text(name)
        expect(row.locator(".match")).to_have_count(per_row)
        expect(row.locator(".result-error")).to_have_count(0)
        expect(row.locator(".query-image")).to_have_attribute("alt", re.compile(re.escape(name)))
        scores = row_scores(row)
        assert scores == sorted(scores, reverse=True), f"scores of row {i} are not best-first: {scores}"
    for img in rows.locator(".match img").all():
        assert (img.get_attribute("alt") or "").strip(), "every match thumbnail needs alt text"


def assert_readable_error(row, about: re.Pattern) -> str:
    error = row.locator(".result-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(about)
    text = error.inner_text()
    # Words for people: no JSON, no bare error codes as the message.
    assert "{" not in text and not re.match(r"^\s*[a-z_]+\s*$", text), text
    expect(row.locator(".match")).to_have_count(0)
    return text


def assert_same_origin(ui: Ui) -> None:
    """Every request the page made went to the application's own origin."""
    assert ui.requests, "no requests recorded"
    outside = []
    for request in ui.requests:
        url = request.url
        if url.startswith("data:"):
            continue
        if url.startswith("blob:"):
            url = url[len("blob:") :]  # blob:http://127.0.0.1:PORT/uuid carries its origin
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != ui.origin or parts.hostname != "127.0.0.1":
            outside.append(request.url)
    assert not outside, f"requests left the origin {ui.origin}: {outside}"


def assert_no_page_errors(ui: Ui, allowed: re.Pattern | None = None) -> None:
    """No uncaught exception, no CSP violation, no failed load (except `allowed` ones)."""
    problems = [p for p in ui.problems if not (allowed and allowed.search(p))]
    assert not problems, problems


def assert_only_thumbnails_requested(ui: Ui, thumbnail_sizes: list[int]) -> None:
    """The page asked for result images only as server thumbnails (/images/<id>?size=N)."""
    image_requests = [r for r in ui.requests if urlsplit(r.url).path.startswith("/images/")]
    assert image_requests, "no result images were requested"
    for request in image_requests:
        sizes = parse_qs(urlsplit(request.url).query).get("size")
        assert sizes and int(sizes[0]) in thumbnail_sizes, f"not a thumbnail request: {request.url}"


def answered_filenames(request: Request) -> list[str]:
    """The file names the server answered for, in order: one entry per uploaded `files` field.

    (Chromium does not expose multipart bodies holding files to Playwright, so the request is
    checked through its answer.)
    """
    response = request.response()
    assert response is not None, f"no response to {request.url}"
    return [entry["filename"] for entry in response.json()["results"]]


def screenshot(ui: Ui, folder: Path, name: str) -> None:
    ui.page.screenshot(path=str(folder / f"ui-{name}.png"), full_page=True)


# ---------------------------------------------------------------- tests


def test_empty_state_shows_what_to_do_and_index_details(ui: Ui, api_info: dict, screenshots: Path):
    page = ui.page
    expect(page.locator("#empty-state")).to_be_visible()
    expect(page.locator("#empty-state")).to_contain_text("Pick one or more photos")
    info = page.locator("#index-info")
    expect(info).to_contain_text(api_info["model"])
    expect(info).to_contain_text(f"{api_info['index_size']:,}")
    expect(page.locator("#drop-zone")).to_be_visible()
    expect(ui.rows()).to_have_count(0)
    expect(page.locator("#k-input")).to_have_value(str(api_info["default_k"]))
    expect(page.locator("#k-input")).to_have_attribute("max", str(api_info["max_k"]))
    screenshot(ui, screenshots, "empty")
    assert_same_origin(ui)
    assert_no_page_errors(ui)


def test_two_photos_show_a_row_of_matches_each(ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path):
    photos = indexed_images[:2]
    ui.upload(*photos)
    per_row = expected_matches(api_info)

    assert_rows_have_results(ui, [p.name for p in photos], per_row)
    wait_thumbnails_loaded(ui, 2 * per_row)
    expect(ui.page.locator("#empty-state")).to_be_hidden()
    expect(ui.page.locator("#search-status")).to_have_attribute("aria-busy", "false")
    expect(ui.page.locator("#results")).to_have_attribute("aria-busy", "false")
    screenshot(ui, screenshots, "results")

    # Both photos went up in one request, as two `files` fields.
    searches = ui.search_requests()
    assert len(searches) == 1, [r.url for r in searches]
    assert answered_filenames(searches[0]) == [p.name for p in photos]
    assert parse_qs(urlsplit(searches[0].url).query)["k"] == [str(api_info["default_k"])]

    assert_same_origin(ui)
    assert_only_thumbnails_requested(ui, api_info["thumbnail_sizes"])
    assert_no_page_errors(ui)


def test_text_file_named_jpg_shows_a_readable_error(ui: Ui, text_named_jpg: Path, screenshots: Path):
    ui.upload(text_named_jpg)
    rows = ui.rows()
    expect(rows).to_have_count(1)
    expect(rows.nth(0).locator(".query-name")).to_have_text(text_named_jpg.name)
    assert_readable_error(rows.nth(0), re.compile(r"image", re.I))
    expect(ui.page.locator("#search-status")).to_have_attribute("aria-busy", "false")
    screenshot(ui, screenshots, "error")
    assert_same_origin(ui)
    # The browser logs the 400 of POST /search itself; nothing else may go wrong.
    assert_no_page_errors(ui, allowed=re.compile(r"status of 400"))


def test_good_and_bad_photo_together_show_results_and_error(
    ui: Ui, api_info: dict, indexed_images: list[Path], text_named_jpg: Path, screenshots: Path
):
    good = indexed_images[0]
    ui.upload(good, text_named_jpg)
    rows = ui.rows()
    expect(rows).to_have_count(2)

    per_row = expected_matches(api_info)
    expect(rows.nth(0).locator(".match")).to_have_count(per_row)
    expect(rows.nth(0).locator(".result-error")).to_have_count(0)
    assert_readable_error(rows.nth(1), re.compile(r"image", re.I))
    wait_thumbnails_loaded(ui, per_row)
    screenshot(ui, screenshots, "mixed")

    searches = ui.search_requests()
    assert len(searches) == 1, [r.url for r in searches]
    assert answered_filenames(searches[0]) == [good.name, text_named_jpg.name]
    assert_same_origin(ui)
    assert_only_thumbnails_requested(ui, api_info["thumbnail_sizes"])


def test_k_control_changes_the_number_of_matches(ui: Ui, api_info: dict, indexed_images: list[Path]):
    ui.upload(indexed_images[0])
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(expected_matches(api_info))

    k_input = ui.page.locator("#k-input")
    small = 2 if api_info["max_k"] >= 2 else 1
    k_input.fill(str(small))
    k_input.press("Enter")
    expect(row.locator(".match")).to_have_count(expected_matches(api_info, small))

    larger = min(api_info["max_k"], api_info["default_k"] + 3)
    k_input.fill(str(larger))
    k_input.press("Enter")
    expect(row.locator(".match")).to_have_count(expected_matches(api_info, larger))

    # Beyond max_k the page searches with max_k instead of sending a request the server refuses.
    k_input.fill(str(api_info["max_k"] + 50))
    k_input.press("Enter")
    expect(k_input).to_have_value(str(api_info["max_k"]))
    expect(row.locator(".match")).to_have_count(expected_matches(api_info, api_info["max_k"]))

    sent = [parse_qs(urlsplit(r.url).query)["k"][0] for r in ui.search_requests()]
    assert sent[-3:] == [str(small), str(larger), str(api_info["max_k"])], sent
    assert_same_origin(ui)


# Holds POST /search in the browser until the test releases it, to observe the busy state.
HOLD_SEARCH = """
(() => {
  const realFetch = window.fetch.bind(window);
  window.__heldSearches = [];
  window.__releaseSearches = () => { window.__heldSearches.splice(0).forEach((release) => release()); };
  window.fetch = async (input, init) => {
    // The page fetches relative URLs ("search?k=5"): compare the path they resolve to.
    if (new URL(String(input), document.baseURI).pathname.startsWith('/search')) {
      await new Promise((release) => window.__heldSearches.push(release));
    }
    return realFetch(input, init);
  };
})();
"""


def test_busy_state_while_searching_and_a_second_search_after(
    browser: Browser, serve_base_url: str, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    context, ui = open_page(browser, serve_base_url, DESKTOP, init_script=HOLD_SEARCH)
    try:
        page, status = ui.page, ui.page.locator("#search-status")
        ui.upload(indexed_images[0])
        # The preview shows at once, before any answer from the server.
        expect(ui.rows()).to_have_count(1)
        page.wait_for_function("() => document.querySelector('.result-row .query-image').naturalWidth > 0")
        expect(status).to_have_attribute("aria-busy", "true")
        expect(page.locator("#results")).to_have_attribute("aria-busy", "true")
        expect(status).to_contain_text("Searching")
        expect(status.locator(".spinner")).to_be_visible()
        expect(ui.rows().nth(0)).to_have_attribute("data-state", "pending")
        page.wait_for_function("() => window.__heldSearches.length === 1")
        screenshot(ui, screenshots, "busy")

        page.evaluate("window.__releaseSearches()")
        expect(ui.rows().nth(0).locator(".match")).to_have_count(expected_matches(api_info))
        expect(status).to_have_attribute("aria-busy", "false")
        expect(status.locator(".spinner")).to_be_hidden()

        # A second search, with other photos, once the first has finished: they join as rows of their
        # own (the earlier row stays, as it does for phrases), all searched in one request.
        ui.upload(indexed_images[1], indexed_images[2])
        expect(status).to_have_attribute("aria-busy", "true")
        page.wait_for_function("() => window.__heldSearches.length === 1")
        page.evaluate("window.__releaseSearches()")
        assert_rows_have_results(ui, [p.name for p in indexed_images[:3]], expected_matches(api_info))
        expect(status).to_have_attribute("aria-busy", "false")
        assert len(ui.search_requests()) == 2
        assert_same_origin(ui)
    finally:
        context.close()


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        # Ray Serve's own backpressure answer: not JSON at all.
        (503, {"Retry-After": "3", "Content-Type": "text/plain"}, "Service Unavailable", r"busy.*3 seconds"),
        (
            413,
            {"Content-Type": "application/json"},
            json.dumps({"error": {"code": "too_many_files", "message": "at most N files", "filename": None}}),
            r"Too many photos",
        ),
        (
            413,
            {"Content-Type": "application/json"},
            json.dumps({"error": {"code": "too_many_pixels", "message": "too many pixels", "filename": "__NAME__"}}),
            r"too many pixels",
        ),
    ],
    ids=["overloaded-plain-text", "too-many-files", "too-many-pixels"],
)
def test_request_level_errors_are_shown_in_words(
    ui: Ui, indexed_images: list[Path], status: int, headers: dict, body: str, expected: str
):
    """Errors hard to provoke on a healthy server, answered by a stand-in for POST /search."""
    photo = indexed_images[0]
    ui.page.route(
        "**/search?*",
        lambda route: route.fulfill(status=status, headers=headers, body=body.replace("__NAME__", photo.name)),
    )
    ui.upload(photo)
    expect(ui.rows()).to_have_count(1)
    assert_readable_error(ui.rows().nth(0), re.compile(expected, re.I))
    expect(ui.page.locator("#search-status")).to_have_attribute("aria-busy", "false")


def test_drop_zone_is_keyboard_usable(ui: Ui, api_info: dict, indexed_images: list[Path]):
    page = ui.page
    drop_zone = page.locator("#drop-zone")
    # Tab reaches the drop zone (after the skip link) and shows a visible focus ring.
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(drop_zone).to_be_focused()
    outline = drop_zone.evaluate("(el) => getComputedStyle(el).outlineStyle")
    assert outline not in ("none", ""), outline

    for key in ("Enter", " "):
        with page.expect_file_chooser() as chooser:
            drop_zone.press(key)
        assert chooser.value.is_multiple()
    chooser.value.set_files(str(indexed_images[0]))
    expect(ui.rows().nth(0).locator(".match")).to_have_count(expected_matches(api_info))


def test_click_on_a_match_shows_the_full_size_image(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    ui.upload(indexed_images[0])
    first = ui.rows().nth(0).locator(".match").first
    expect(first).to_be_visible()
    href = first.get_attribute("href")
    assert href and re.fullmatch(r"/images/\d+", href), href
    # Nothing full-size was fetched before it was asked for.
    assert_only_thumbnails_requested(ui, api_info["thumbnail_sizes"])

    first.click()
    lightbox = ui.page.locator("#lightbox")
    expect(lightbox).to_be_visible()
    expect(ui.page.locator("#lightbox-image")).to_have_attribute("src", href)
    ui.page.wait_for_function("() => document.querySelector('#lightbox-image').naturalWidth > 0")
    screenshot(ui, screenshots, "lightbox")
    ui.page.keyboard.press("Escape")
    expect(lightbox).to_be_hidden()
    expect(first).to_be_focused()
    assert_same_origin(ui)


def test_phone_width_layout(phone_ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path):
    ui = phone_ui
    ui.upload(*indexed_images[:2])
    per_row = expected_matches(api_info)
    assert_rows_have_results(ui, [p.name for p in indexed_images[:2]], per_row)
    wait_thumbnails_loaded(ui, 2 * per_row)
    overflow = ui.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    ui.page.evaluate("window.scrollTo(0, 0)")
    screenshot(ui, screenshots, "phone-results")
    assert_same_origin(ui)


# ---------------------------------------------------------------- words and combined searches


def search_words(ui: Ui, text: str) -> None:
    box = ui.page.locator("#text-input")
    box.fill(text)
    box.press("Enter")


def answered_queries(request: Request) -> list[dict]:
    response = request.response()
    assert response is not None, f"no response to {request.url}"
    return response.json()["results"]


def test_typing_words_and_enter_shows_a_row_of_matches(ui: Ui, api_info: dict, screenshots: Path):
    assert api_info["text_search"] is True
    search_words(ui, "a red bicycle by a canal")
    rows = ui.rows()
    expect(rows).to_have_count(1)
    row = rows.nth(0)
    expect(row).to_have_attribute("data-text", "a red bicycle by a canal")
    expect(row.locator(".query-text")).to_have_text("a red bicycle by a canal")
    per_row = expected_matches(api_info)
    expect(row.locator(".match")).to_have_count(per_row)
    scores = row_scores(row)
    assert scores == sorted(scores, reverse=True)
    wait_thumbnails_loaded(ui, per_row)
    expect(ui.page.locator("#text-input")).to_have_value("")  # ready for the next phrase
    expect(ui.page.locator("#search-status")).to_contain_text("1 phrase")
    screenshot(ui, screenshots, "text")

    (search,) = ui.search_requests()
    assert [entry["text"] for entry in answered_queries(search)] == ["a red bicycle by a canal"]
    assert_same_origin(ui)
    assert_only_thumbnails_requested(ui, api_info["thumbnail_sizes"])
    assert_no_page_errors(ui)


def test_a_phrase_joins_the_photos_of_the_search_as_its_own_row(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    photo = indexed_images[0]
    ui.upload(photo)
    per_row = expected_matches(api_info)
    expect(ui.rows().nth(0).locator(".match")).to_have_count(per_row)
    search_words(ui, "東京の夜 🚲")
    search_words(ui, "sunset over the sea")
    rows = ui.rows()
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator(".query-name")).to_have_text(photo.name)
    expect(rows.nth(1)).to_have_attribute("data-text", "東京の夜 🚲")
    expect(rows.nth(2)).to_have_attribute("data-text", "sunset over the sea")
    for i in range(3):
        expect(rows.nth(i).locator(".match")).to_have_count(per_row)
        expect(rows.nth(i).locator(".result-error")).to_have_count(0)
    wait_thumbnails_loaded(ui, 3 * per_row)
    screenshot(ui, screenshots, "photo-and-text")

    # The last search sent the photo and both phrases together; the server answered in that order.
    last = ui.search_requests()[-1]
    entries = answered_queries(last)
    assert [entry.get("filename") or entry.get("text") for entry in entries] == [
        photo.name,
        "東京の夜 🚲",
        "sunset over the sea",
    ]
    assert_same_origin(ui)
    assert_no_page_errors(ui)


def test_a_long_phrase_says_only_its_beginning_was_used(ui: Ui, api_info: dict):
    search_words(ui, " ".join(["a red bicycle by the canal at night"] * 20))
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(expected_matches(api_info))
    expect(row).to_have_attribute("data-truncated", "true")
    expect(row.locator(".row-status")).to_contain_text("only the beginning")


def test_combine_mode_shows_chips_with_weights_and_one_row(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    page = ui.page
    page.locator("#combine-input").check()
    photo = indexed_images[4]
    ui.upload(photo)
    search_words(ui, "at night")
    search_words(ui, "people")
    rows = ui.rows()
    expect(rows).to_have_count(1)
    row = rows.nth(0)
    chips = row.locator(".chip")
    expect(chips).to_have_count(3)
    expect(chips.nth(0)).to_have_attribute("data-kind", "file")
    expect(chips.nth(1)).to_have_attribute("data-name", "at night")
    per_row = expected_matches(api_info)
    expect(row.locator(".match")).to_have_count(per_row)

    # "people" down to -1: two steps of 0.5 from +1, each re-running the combined search.
    people = chips.nth(2)
    people.get_by_role("button", name="Lower the weight of people").click()
    expect(people.locator(".chip-weight")).to_have_text("+0.5")
    people.get_by_role("button", name="Lower the weight of people").click()
    people.get_by_role("button", name="Lower the weight of people").click()
    expect(people.locator(".chip-weight")).to_have_text("−0.5")
    people.get_by_role("button", name="Lower the weight of people").click()
    expect(people.locator(".chip-weight")).to_have_text("−1")
    expect(people).to_have_class(re.compile(r"\bis-negative\b"))
    page.wait_for_function(
        """() => {
            const row = document.querySelector('.combined-row');
            return row && row.dataset.state === 'done';
        }"""
    )
    expect(row.locator(".match")).to_have_count(per_row)
    wait_thumbnails_loaded(ui, per_row)
    screenshot(ui, screenshots, "combined")

    combined = [r for r in ui.requests if r.method == "POST" and urlsplit(r.url).path == "/search/combined"]
    assert combined, "combine mode must use POST /search/combined"
    # Requests superseded by a newer click were aborted; the last one answered with these weights.
    answered = [r for r in combined if r.response() is not None]
    (entry,) = answered_queries(answered[-1])
    assert entry["combined"] == [
        {"filename": photo.name, "weight": 1.0},
        {"text": "at night", "weight": 1.0},
        {"text": "people", "weight": -1.0},
    ]
    assert [m["id"] for m in entry["matches"]] == [
        int(link.get_attribute("data-id")) for link in row.locator(".match").all()
    ]

    # Leaving combine mode shows each query as its own row again.
    page.locator("#combine-input").uncheck()
    expect(ui.rows()).to_have_count(3)
    for i in range(3):
        expect(ui.rows().nth(i).locator(".match")).to_have_count(per_row)
    assert_same_origin(ui)
    assert_no_page_errors(ui, allowed=re.compile(r"net::ERR_ABORTED|aborted", re.I))


def test_weights_that_cancel_out_are_explained(ui: Ui):
    ui.page.locator("#combine-input").check()
    search_words(ui, "a dog")
    search_words(ui, "a dog")
    second = ui.rows().nth(0).locator(".chip").nth(1)
    for _ in range(4):  # +1 -> -1
        second.get_by_role("button", name="Lower the weight of a dog").click()
    expect(second.locator(".chip-weight")).to_have_text("−1")
    assert_readable_error(ui.rows().nth(0), re.compile(r"cancel", re.I))
    assert_no_page_errors(ui, allowed=re.compile(r"status of 422|net::ERR_ABORTED|aborted", re.I))


def test_phone_width_with_words_and_combine(
    phone_ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    ui = phone_ui
    ui.upload(indexed_images[1])
    search_words(ui, "a photo of two cats sitting on a table")
    expect(ui.rows()).to_have_count(2)
    expect(ui.rows().nth(1).locator(".match")).to_have_count(expected_matches(api_info))
    ui.page.locator("#combine-input").check()
    expect(ui.rows()).to_have_count(1)
    expect(ui.rows().nth(0).locator(".match")).to_have_count(expected_matches(api_info))
    overflow = ui.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
    ui.page.evaluate("window.scrollTo(0, 0)")
    screenshot(ui, screenshots, "phone-combined")
    assert_same_origin(ui)


def test_demo_data_is_announced_in_a_banner(browser: Browser, serve_base_url: str, api_info: dict, screenshots: Path):
    """A service on the offline demo checkpoint says so on /info; the page must make it impossible to miss."""
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        demo_info = json.dumps({**api_info, "demo_data": True})
        page.route("**/info", lambda route: route.fulfill(status=200, content_type="application/json", body=demo_info))
        page.goto(serve_base_url + "/")
        banner = page.locator("#demo-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("random model, scores mean nothing")
        page.screenshot(path=str(screenshots / "ui-demo-banner.png"))
    finally:
        context.close()
    # The real (non-demo) service shows no banner.
    real_context, real = open_page(browser, serve_base_url, DESKTOP)
    try:
        expect(real.page.locator("#demo-banner")).to_be_hidden()
    finally:
        real_context.close()


def test_a_k_above_the_maximum_is_capped_and_the_page_says_so(ui: Ui, api_info: dict, indexed_images: list[Path]):
    ui.page.locator("#k-input").fill(str(api_info["max_k"] + 50))
    ui.upload(indexed_images[0])
    expect(ui.rows()).to_have_count(1)
    expect(ui.page.locator("#k-note")).to_contain_text(f"Capped at {api_info['max_k']}")
    expect(ui.page.locator("#k-input")).to_have_value(str(api_info["max_k"]))
    (search,) = ui.search_requests()
    assert parse_qs(urlsplit(search.url).query)["k"] == [str(api_info["max_k"])]


def test_matches_that_share_a_file_name_show_their_folders(ui: Ui, indexed_images: list[Path]):
    photo = indexed_images[0]
    twins = [
        {"id": 1, "path": "holiday/IMG_0001.jpg", "score": 0.9},
        {"id": 2, "path": "work/IMG_0001.jpg", "score": 0.8},
        {"id": 3, "path": "work/other.jpg", "score": 0.7},
    ]
    for match in twins:
        match.update(url=f"/images/{match['id']}", thumbnail_url=f"/images/{match['id']}?size=256")
    body = json.dumps({"results": [{"filename": photo.name, "matches": twins}]})
    ui.page.route("**/search?*", lambda route: route.fulfill(status=200, content_type="application/json", body=body))
    ui.upload(photo)
    names = ui.rows().nth(0).locator(".match-name")
    expect(names).to_have_text(["holiday/IMG_0001.jpg", "work/IMG_0001.jpg", "other.jpg"])


def test_the_search_box_says_when_the_model_has_no_text_search(
    browser: Browser, serve_base_url: str, api_info: dict, screenshots: Path
):
    """A checkpoint without a text tower reports text_search false on /info; photos still work."""
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        no_text_info = json.dumps({**api_info, "text_search": False})
        page.route(
            "**/info", lambda route: route.fulfill(status=200, content_type="application/json", body=no_text_info)
        )
        page.goto(serve_base_url + "/")
        expect(page.locator("#text-hint")).to_contain_text("off")
        expect(page.locator("#text-input")).to_be_disabled()
        expect(page.locator("#text-button")).to_be_disabled()
        expect(page.locator("#drop-zone")).to_be_visible()
        page.screenshot(path=str(screenshots / "ui-no-text-search.png"), full_page=True)
    finally:
        context.close()


# ---------------------------------------------------------------- issue 20: every feature on the page


def match_ids(row) -> list[int]:
    return [int(item.get_attribute("data-id")) for item in row.locator(".matches > li").all()]


def match_paths(row) -> list[str]:
    return [item.get_attribute("data-path") or "" for item in row.locator(".matches > li").all()]


def api_get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def test_similar_on_a_result_adds_a_row_of_more_like_it_without_that_image(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    ui.upload(indexed_images[0])
    first_row = ui.rows().nth(0)
    per_row = expected_matches(api_info)
    expect(first_row.locator(".match")).to_have_count(per_row)
    before = match_ids(first_row)
    # The second match (the first is the photo itself): "Similar" under it.
    chosen = first_row.locator(".matches > li").nth(1)
    chosen_id = int(chosen.get_attribute("data-id"))
    name = chosen.get_attribute("data-name")
    chosen.get_by_role("button", name=f"More like {name}").click()

    rows = ui.rows()
    expect(rows).to_have_count(2)  # the photo's row stays; the new query adds a row
    similar = rows.nth(1)
    expect(similar).to_have_attribute("data-similar-to", str(chosen_id))
    expect(similar.locator(".query-kind")).to_have_text("More like this")
    expect(similar.locator(".query-name")).to_have_text(name)
    expect(similar.locator(".match")).to_have_count(min(api_info["default_k"], api_info["index_size"] - 1))
    ids = match_ids(similar)
    assert chosen_id not in ids, (chosen_id, ids)
    assert ids != before
    # What the row shows is what the service answers for GET /images/{id}/similar.
    answer = api_get(f"{ui.base_url}/images/{chosen_id}/similar?k={api_info['default_k']}")
    assert ids == [match["id"] for match in answer["results"][0]["matches"]]
    assert any(urlsplit(r.url).path == f"/images/{chosen_id}/similar" for r in ui.requests)
    wait_thumbnails_loaded(ui, per_row + len(ids))
    screenshot(ui, screenshots, "similar")
    assert_same_origin(ui)
    assert_no_page_errors(ui)


def test_similar_in_combine_mode_joins_as_a_chip(ui: Ui, api_info: dict, indexed_images: list[Path]):
    ui.upload(indexed_images[0])
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(expected_matches(api_info))
    chosen = row.locator(".matches > li").nth(1)
    name = chosen.get_attribute("data-name")
    ui.page.locator("#combine-input").check()
    ui.rows().nth(0).locator(".matches > li").nth(1).get_by_role("button", name=f"More like {name}").click()
    chips = ui.rows().nth(0).locator(".chip")
    expect(chips).to_have_count(2)
    expect(chips.nth(1)).to_have_attribute("data-kind", "similar")
    expect(ui.rows().nth(0)).to_have_attribute("data-state", "done")
    expect(ui.rows().nth(0).locator(".match")).to_have_count(expected_matches(api_info))
    combined = [r for r in ui.requests if urlsplit(r.url).path == "/search/combined" and r.response() is not None]
    (entry,) = answered_queries(combined[-1])
    assert [part.get("filename") for part in entry["combined"]] == [indexed_images[0].name, Path(name).name]


def test_the_folder_filter_restricts_every_row_to_that_folder(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    folders = api_get(ui.base_url + "/folders")["folders"]
    nested = next(folder for folder in folders if folder["prefix"] == "nested/")
    select = ui.page.locator("#folder-select")
    expect(select.locator("option")).to_have_count(1 + len(folders))
    expect(select.locator("option").nth(1)).to_have_text(f"nested/ ({nested['count']} images)")

    outside = next(p for p in indexed_images if p.parent.name != "nested")
    ui.upload(outside)
    search_words(ui, "a photo")
    rows = ui.rows()
    expect(rows).to_have_count(2)
    per_row = expected_matches(api_info)
    expect(rows.nth(1).locator(".match")).to_have_count(per_row)

    select.select_option("nested/")
    in_folder = min(api_info["default_k"], nested["count"])
    for i in range(2):
        expect(rows.nth(i).locator(".row-status")).to_contain_text("in nested/")
        expect(rows.nth(i).locator(".match")).to_have_count(in_folder)
        paths = match_paths(rows.nth(i))
        assert paths and all(path.startswith("nested/") for path in paths), paths
    last = ui.search_requests()[-1]
    assert parse_qs(urlsplit(last.url).query)["prefix"] == ["nested/"]
    wait_thumbnails_loaded(ui, 2 * in_folder)
    screenshot(ui, screenshots, "folder-filter")

    # The photo outside the folder finds itself again once the filter is off.
    select.select_option("")
    expect(rows.nth(0).locator(".row-status")).not_to_contain_text("in nested/")
    expect(rows.nth(0).locator(".match")).to_have_count(per_row)
    assert match_paths(rows.nth(0))[0] == outside.name
    assert "prefix" not in parse_qs(urlsplit(ui.search_requests()[-1].url).query)
    assert_no_page_errors(ui)


def test_photos_and_phrases_both_add_rows_and_the_page_says_so(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    hint = ui.page.locator("#rows-hint")
    expect(hint).to_be_visible()
    expect(hint).to_contain_text("Each photo and each phrase adds a row")
    expect(hint).to_contain_text("Clear")
    per_row = expected_matches(api_info)
    ui.upload(indexed_images[0])
    expect(ui.rows().nth(0).locator(".match")).to_have_count(per_row)
    search_words(ui, "a cat")
    expect(ui.rows().nth(1).locator(".match")).to_have_count(per_row)
    # A photo chosen after the phrase no longer wipes the rows: it adds one, at the end.
    ui.upload(indexed_images[1])
    rows = ui.rows()
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator(".query-name")).to_have_text(indexed_images[0].name)
    expect(rows.nth(1)).to_have_attribute("data-text", "a cat")
    expect(rows.nth(2).locator(".query-name")).to_have_text(indexed_images[1].name)
    for i in range(3):
        expect(rows.nth(i).locator(".match")).to_have_count(per_row)
    # One request (photos first, as the server answers); each row shows its own query's answer.
    entries = answered_queries(ui.search_requests()[-1])
    by_query = {entry.get("filename") or entry.get("text"): [m["id"] for m in entry["matches"]] for entry in entries}
    assert match_ids(rows.nth(0)) == by_query[indexed_images[0].name]
    assert match_ids(rows.nth(1)) == by_query["a cat"]
    assert match_ids(rows.nth(2)) == by_query[indexed_images[1].name]
    # "Clear" starts over.
    ui.page.locator("#clear-button").click()
    expect(ui.rows()).to_have_count(0)
    expect(ui.page.locator("#empty-state")).to_be_visible()


def test_k_of_zero_and_k_above_the_maximum_both_say_what_was_used(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    ui.upload(indexed_images[0])
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(expected_matches(api_info))
    k_input, note = ui.page.locator("#k-input"), ui.page.locator("#k-note")
    expect(note).to_be_hidden()

    k_input.fill("0")
    k_input.press("Enter")
    expect(k_input).to_have_value("1")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Raised to 1")
    expect(row.locator(".match")).to_have_count(1)
    assert parse_qs(urlsplit(ui.search_requests()[-1].url).query)["k"] == ["1"]
    screenshot(ui, screenshots, "k-zero")

    k_input.fill("500")
    k_input.press("Enter")
    expect(k_input).to_have_value(str(api_info["max_k"]))
    expect(note).to_contain_text(f"Capped at {api_info['max_k']}")
    expect(row.locator(".match")).to_have_count(expected_matches(api_info, api_info["max_k"]))
    screenshot(ui, screenshots, "k-capped")

    # A number in range clears the note.
    k_input.fill("3")
    k_input.press("Enter")
    expect(row.locator(".match")).to_have_count(expected_matches(api_info, 3))
    expect(note).to_be_hidden()


# Dispatches a drag event with a file on the drop zone (what a person's drag from the desktop does).
DRAG_FILE = """([type, name, b64]) => {
    const data = new DataTransfer();
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    data.items.add(new File([bytes], name, { type: 'image/jpeg' }));
    const zone = document.querySelector('#drop-zone');
    zone.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: data }));
}"""


def test_dragging_a_file_over_the_page_highlights_the_drop_zone_plainly(
    ui: Ui, api_info: dict, indexed_images: list[Path], screenshots: Path
):
    import base64

    page, zone = ui.page, ui.page.locator("#drop-zone")
    photo = indexed_images[0]
    b64 = base64.b64encode(photo.read_bytes()).decode()
    style = "(el) => { const s = getComputedStyle(el); return [s.borderTopStyle, s.borderTopWidth, s.boxShadow]; }"
    resting = zone.evaluate(style)
    assert resting[0] == "dashed" and resting[2] == "none", resting

    page.evaluate(DRAG_FILE, ["dragenter", photo.name, b64])
    expect(zone).to_have_class(re.compile(r"\bis-dragover\b"))
    expect(zone.locator(".drop-now")).to_be_visible()
    expect(zone.locator(".drop-now")).to_have_text("Drop to search")
    border_style, border_width, shadow = zone.evaluate(style)
    assert border_style == "solid" and float(border_width.rstrip("px")) >= 3, (border_style, border_width)
    assert shadow != "none", shadow
    screenshot(ui, screenshots, "drag-over")

    page.evaluate(DRAG_FILE, ["dragleave", photo.name, b64])
    expect(zone).not_to_have_class(re.compile(r"\bis-dragover\b"))
    expect(zone.locator(".drop-now")).to_be_hidden()

    # Dropping it searches with it, like choosing it.
    page.evaluate(DRAG_FILE, ["dragenter", photo.name, b64])
    page.evaluate(DRAG_FILE, ["drop", photo.name, b64])
    expect(zone).not_to_have_class(re.compile(r"\bis-dragover\b"))
    assert_rows_have_results(ui, [photo.name], expected_matches(api_info))
    assert match_paths(ui.rows().nth(0))[0].endswith(photo.name)


@pytest.mark.parametrize(
    ("model", "shown"),
    [("model", "an unnamed CLIP model"), ("random CLIP (demo)", "random CLIP (demo)")],
    ids=["bare-folder-name", "demo"],
)
def test_the_header_names_the_model_in_words(
    browser: Browser, serve_base_url: str, api_info: dict, model: str, shown: str
):
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        fake = json.dumps({**api_info, "model": model})
        page.route("**/info", lambda route: route.fulfill(status=200, content_type="application/json", body=fake))
        page.goto(serve_base_url + "/")
        info = page.locator("#index-info")
        expect(info).to_contain_text(f"searched with {shown}")
        assert "model model" not in info.inner_text().lower()
    finally:
        context.close()


def test_the_real_model_name_is_shown_and_writes_controls_stay_hidden_when_writes_are_off(
    ui: Ui, api_info: dict, indexed_images: list[Path]
):
    assert api_info["writes"] is False
    expect(ui.page.locator("#index-info")).to_contain_text(f"searched with {api_info['model']}")
    expect(ui.page.locator("#collection-panel")).to_be_hidden()
    ui.upload(indexed_images[0])
    row = ui.rows().nth(0)
    expect(row.locator(".match-similar")).to_have_count(expected_matches(api_info))
    expect(row.locator(".match-remove")).to_have_count(0)


# ---------------------------------------------------------------- writes and near-duplicates: an app of our own

PAGE_APP = "pagewrites"
WRITE_TOKEN = "page-write-token-0123456789abcdef"
# Between the copies' cosines and the distinct photos' for the tiny random model (tests/test_queries_http.py).
DEDUP_COSINE = 0.995


@dataclass
class WritesApp:
    url: str
    original: Path  # a photo with three near-duplicates in dups/
    original_key: str
    copies: list[str]  # their keys


@pytest.fixture(scope="module")
def writes_app(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, serve_port: int) -> Iterator[WritesApp]:
    """A second application on the session's Serve instance: writes on (a token file), and a collection
    with near-duplicates of one photo (an exact copy, a re-encoding, a crop)."""
    import io

    from PIL import Image

    from tests.living import build, served_app
    from tests.support import write_image_folder

    root = tmp_path_factory.mktemp("page-writes")
    images, index = root / "images", root / "index"
    originals = write_image_folder(images, 8, start_seed=300)
    original = next(p for p in originals if p.suffix == ".jpg")
    dups = images / "dups"
    dups.mkdir()
    (dups / "copy.jpg").write_bytes(original.read_bytes())
    picture = Image.open(original).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=60)
    (dups / "reencoded.jpg").write_bytes(buffer.getvalue())
    w, h = picture.size
    picture.crop((4, 4, w - 4, h - 4)).save(dups / "crop.png")
    build(images, index, tiny_model_dir)
    (root / "token").write_text(WRITE_TOKEN + "\n")
    args = {
        "model": str(tiny_model_dir),
        "index": str(index),
        "thumbnail_cache_dir": str(root / "thumbnails"),
        "embedder": {"num_threads": 1},
        "limits": {"max_files": 8, "max_file_bytes": 2_000_000, "dedup_cosine": DEDUP_COSINE},
        "request_timeout_s": 30,
        "reload_interval_s": 0.5,
        "writes": {"token_file": str(root / "token"), "lock_wait_s": 5},
    }
    options = {"Writer": {"ray_actor_options": {"num_cpus": 0.1}}, "Ingress": {"ray_actor_options": {"num_cpus": 0.1}}}
    with served_app(PAGE_APP, serve_port, args, options) as base_url:
        key = original.relative_to(images).as_posix()
        yield WritesApp(base_url, original, key, ["dups/copy.jpg", "dups/reencoded.jpg", "dups/crop.png"])


@pytest.fixture
def writes_ui(browser: Browser, writes_app: WritesApp):
    context, ui = open_page(browser, writes_app.url, DESKTOP)
    yield ui
    context.close()


def test_hide_near_duplicates_collapses_copies_into_one_match(writes_ui: Ui, writes_app: WritesApp, screenshots: Path):
    ui = writes_ui
    group = {writes_app.original_key, *writes_app.copies}
    ui.upload(writes_app.original)
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(5)
    # Without the switch the photo and its three copies fill the top four places.
    assert set(match_paths(row)[:4]) == group, match_paths(row)
    expect(row.locator(".match-duplicates")).to_have_count(0)

    ui.page.locator("#dedup-input").check()
    expect(row.locator(".row-status")).to_contain_text("near-duplicates hidden")
    expect(row.locator(".match")).to_have_count(5)
    paths = match_paths(row)
    assert len(group & set(paths)) == 1, paths  # one match stands for the group
    expect(row.locator(".match-duplicates")).to_have_count(1)
    expect(row.locator(".matches > li").first.locator(".match-duplicates")).to_have_text("+3 near-duplicates hidden")
    last = ui.search_requests()[-1]
    assert parse_qs(urlsplit(last.url).query)["dedup"] == ["true"]
    (entry,) = answered_queries(last)
    assert match_ids(row) == [m["id"] for m in entry["matches"]]
    assert len(entry["matches"][0]["duplicates"]) == 3
    wait_thumbnails_loaded(ui, 5)
    screenshot(ui, screenshots, "dedup")

    ui.page.locator("#dedup-input").uncheck()
    expect(row.locator(".match-duplicates")).to_have_count(0)
    expect(row.locator(".row-status")).not_to_contain_text("near-duplicates hidden")
    assert_no_page_errors(ui)


def new_photo(tmp_path: Path, seed: int) -> Path:
    from tests.support import synthetic_image

    path = tmp_path / f"new-{seed}.jpg"
    synthetic_image(seed).save(path, format="JPEG", quality=90)
    return path


def test_add_with_the_token_makes_an_image_searchable_and_remove_takes_it_away(
    writes_ui: Ui, writes_app: WritesApp, tmp_path: Path, screenshots: Path
):
    ui, page = writes_ui, writes_ui.page
    size_before = api_get(writes_app.url + "/info")["index_size"]
    panel = page.locator("#collection-panel")
    expect(panel).to_be_visible()
    photos = [new_photo(tmp_path, 9001), new_photo(tmp_path, 9002)]

    page.locator("#add-file-input").set_input_files([str(p) for p in photos])
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    screenshot(ui, screenshots, "token-dialog")
    page.locator("#token-input").fill(WRITE_TOKEN)
    page.locator("#token-submit").click()
    expect(dialog).to_be_hidden()

    outcomes = page.locator("#add-outcomes > li")
    expect(outcomes).to_have_count(2)
    for i in range(2):
        expect(outcomes.nth(i)).to_have_attribute("data-status", "added")
        expect(outcomes.nth(i)).to_contain_text(photos[i].name)
        expect(outcomes.nth(i)).to_contain_text("Added as uploads/")
    expect(page.locator("#add-progress")).to_have_attribute("value", "2")
    expect(page.locator("#collection-status")).to_have_text("2 files added to the collection.")
    expect(page.locator("#index-info")).to_contain_text(f"{size_before + 2:,}")
    screenshot(ui, screenshots, "add")

    posts = [r for r in ui.requests if r.method == "POST" and urlsplit(r.url).path == f"/{PAGE_APP}/images"]
    assert len(posts) == 2  # one request per file, so progress moves per file
    assert all(r.all_headers().get("authorization") == f"Bearer {WRITE_TOKEN}" for r in posts)
    added = [r.response().json()["results"][0] for r in posts]
    # Kept for this tab only: in sessionStorage, never in localStorage or a cookie.
    assert page.evaluate("() => sessionStorage.getItem('image-search.write-token')") == WRITE_TOKEN
    assert page.evaluate("() => localStorage.length") == 0 and page.context.cookies() == []

    # The added photo is searchable: its own upload as a query finds it first.
    ui.upload(photos[0])
    row = ui.rows().nth(0)
    expect(row.locator(".match")).to_have_count(5)
    assert match_ids(row)[0] == added[0]["id"]

    # Remove on that result (confirmed): gone from the rows and from the service; the token is not asked again.
    page.once("dialog", lambda confirm: confirm.accept())
    row.locator(f'.matches > li[data-id="{added[0]["id"]}"] .match-remove').click()
    expect(page.locator("#collection-status")).to_contain_text("Removed")
    expect(dialog).to_be_hidden()
    expect(row.locator(f'.matches > li[data-id="{added[0]["id"]}"]')).to_have_count(0)
    expect(row.locator(".match")).to_have_count(5)
    expect(page.locator("#index-info")).to_contain_text(f"{size_before + 1:,}")
    deletes = [r for r in ui.requests if r.method == "DELETE"]
    assert [urlsplit(r.url).path for r in deletes] == [f"/{PAGE_APP}/images/{added[0]['id']}"]
    assert deletes[0].all_headers().get("authorization") == f"Bearer {WRITE_TOKEN}"
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(f"{writes_app.url}/images/{added[0]['id']}", timeout=30)
    assert gone.value.code == 404
    screenshot(ui, screenshots, "removed")
    assert_same_origin(ui)
    assert_no_page_errors(ui)


def test_a_wrong_token_is_refused_in_words_and_asked_for_again(
    writes_ui: Ui, writes_app: WritesApp, tmp_path: Path, screenshots: Path
):
    ui, page = writes_ui, writes_ui.page
    size_before = api_get(writes_app.url + "/info")["index_size"]
    photo = new_photo(tmp_path, 9100)
    page.locator("#add-file-input").set_input_files(str(photo))
    # An empty token is not sent: the dialog stays and says what is missing.
    page.locator("#token-submit").click()
    expect(page.locator("#token-message")).to_have_text("Type the write token first.")
    expect(page.locator("#token-dialog")).to_be_visible()
    page.locator("#token-input").fill("not-the-token-0123456789abcdef")
    page.locator("#token-submit").click()
    status = page.locator("#collection-status")
    expect(status).to_contain_text("The write token was not accepted")
    expect(status).to_have_class(re.compile(r"\bis-error\b"))
    outcome = page.locator("#add-outcomes > li")
    expect(outcome).to_have_attribute("data-status", "error")
    expect(outcome).to_contain_text("not accepted")
    screenshot(ui, screenshots, "wrong-token")
    # The refused token is forgotten: nothing kept, and the next try asks again.
    assert page.evaluate("() => sessionStorage.getItem('image-search.write-token')") is None
    assert api_get(writes_app.url + "/info")["index_size"] == size_before
    page.locator("#add-file-input").set_input_files(str(photo))
    expect(page.locator("#token-dialog")).to_be_visible()
    page.locator("#token-cancel").click()
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(status).to_contain_text("Nothing was added")
    assert_no_page_errors(ui, allowed=re.compile(r"status of 401"))
