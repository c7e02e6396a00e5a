"""The HTML explorer in a real headless Chromium (Debian's `chromium`, driven by the Python
package `playwright`, which uses the system browser: no browser download).

Each test loads a file:// page, records every request and console message, drives the
page through its controls (and window.attntraceExplorer to find where things are), and
checks what is drawn against the constructed data in explorer_cases.  A screenshot per
test goes to the test's tmp_path.  Outside CI a missing browser or driver skips these
tests; under CI=true it fails them.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from explorer_cases import CROSS_KEYS, TOKENS, long_data, small_data

from attntrace.render.explorer import explorer_iframe, write_explorer

CHROMIUM = os.environ.get("ATTNTRACE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)     # the colour map's published end points
STEP01 = 1 / 249                                              # documented level spacing of patterns
LOAD_MS = 120_000                                             # generous: a smoke bound, not a benchmark


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true the browser tests must run (apt-get install chromium; "
                    "pip install playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module, with a fresh profile folder."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1, color_scheme="light")
        yield context
        context.close()


class Session:
    """One page, with every request and console message recorded."""

    def __init__(self, context, path, color_scheme="light"):
        self.url = path.as_uri()
        self.page = context.new_page()
        self.page.emulate_media(color_scheme=color_scheme)
        self.requests, self.messages = [], []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.messages.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.messages.append(f"pageerror: {error}"))
        self.page.route("**/*", self._only_the_page)
        self.page.goto(self.url)

    def _only_the_page(self, route):
        if route.request.url == self.url:
            route.continue_()
        else:
            route.abort()

    def wait_ready(self):
        return self.wait_for("html[data-ready='true']")

    def wait_for(self, selector):
        """Wait on an attribute the page sets (polling a JS predicate would need eval, which the CSP forbids)."""
        self.page.locator(selector).wait_for(state="attached", timeout=LOAD_MS)
        return self

    def wait_drawn(self, key):
        return self.wait_for(f"html[data-drawn='{key}']")

    def api(self, expression, frame=None):
        script = f"(async () => {{ const x = window.attntraceExplorer; return {expression}; }})()"
        return (frame or self.page).evaluate(script)

    def assert_clean(self):
        assert self.requests == [self.url], "the page made a request beyond loading itself"
        bad = [m for m in self.messages if m.split(":")[0] in ("error", "warning", "pageerror")]
        assert bad == [], bad

    def select(self, layer, head):
        """Pick a layer and head with the page's own <select> elements, and wait until it is drawn."""
        self.page.select_option("#layer-select", str(layer))
        self.wait_for(f"html[data-drawn^='{layer}.']")
        self.page.select_option("#head-select", str(head))
        self.wait_drawn(f"{layer}.0.{head}")

    def hover_cell(self, q, k):
        centre = self.api(f"x.cellCenter({q}, {k})")
        box = self.page.locator("#heat").bounding_box()
        self.page.mouse.move(box["x"] + centre["x"], box["y"] + centre["y"])
        return self.page.locator("#readout").inner_text()

    def pixel(self, q, k):
        return tuple(self.api(f"x.pixelAt({q}, {k})")[:3])

    def css_colour(self, name):
        text = self.page.evaluate(f"getComputedStyle(document.documentElement).getPropertyValue('{name}').trim()")
        return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))

    def shot(self, path):
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000


def close(rgb, expected, tolerance=3):
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, expected))


def shown(token: str) -> str:
    """A label as the page writes it: a space at either end shows as ␣."""
    core = token.strip(" ")
    lead = len(token) - len(token.lstrip(" "))
    return "␣" * lead + core + "␣" * (len(token) - lead - len(core)) if core else "␣" * len(token)


def quantised(weight: float) -> float:
    """What the page shows for a pattern weight: the nearest of the documented levels."""
    return round(weight * 249) / 249


@pytest.fixture
def small_page(tmp_path):
    path = tmp_path / "small.html"
    write_explorer(path, small_data())
    return path


def test_page_loads_offline_and_draws_the_constructed_weights(browser, small_page, tmp_path):
    s = Session(browser, small_page).wait_ready()
    assert s.page.locator("#layer-select option").count() == 2
    s.select(0, 2)                                       # the sink head with query 3 on keys 0 and 1
    state = s.api("x.state()")
    assert (state["pooled"], state["view"]) == (1, {"r0": 0, "nr": 8, "c0": 0, "nc": 8})
    zero = s.css_colour("--zero")
    assert close(s.pixel(5, 0), VIRIDIS_HIGH)            # weight 1.0
    assert close(s.pixel(5, 3), zero) and not close(zero, VIRIDIS_LOW, 20)   # exactly 0: its own colour
    readout = s.hover_cell(3, 1)
    assert f"query 3 «{shown(TOKENS[3])}» → key 1 «{shown(TOKENS[1])}»: {quantised(0.75):.3f} ± 0.0020" in readout
    assert f"{quantised(0.25):.3f}" in s.hover_cell(3, 0)
    assert "0 (exactly)" in s.hover_cell(3, 2)
    s.page.focus("#heat")                                # the keyboard moves the same cursor: (3, 2) -> (3, 0)
    s.page.keyboard.press("ArrowLeft")
    s.page.keyboard.press("ArrowLeft")
    assert f"query 3 «{shown(TOKENS[3])}» → key 0" in s.page.locator("#readout").inner_text()
    s.select(0, 1)                                       # uniform causal: row 7 holds 1/8 everywhere
    assert f"{quantised(1 / 8):.3f}" in s.hover_cell(7, 4)
    s.shot(tmp_path / "heatmap.png")
    s.assert_clean()


def test_hovering_a_token_shows_whom_it_attends_to(browser, small_page, tmp_path):
    s = Session(browser, small_page).wait_ready()
    s.select(0, 2)
    s.page.hover('#qlist .tok[data-pos="3"]')            # query 3: 0.25 on key 0, 0.75 on key 1
    keys = s.page.locator("#klist .tok")
    weights = [float(keys.nth(i).get_attribute("data-weight")) for i in range(len(TOKENS))]
    assert np.allclose(weights, [0.25, 0.75, 0, 0, 0, 0, 0, 0], atol=STEP01 / 2)
    assert keys.nth(1).locator(".w").inner_text() == "0.75"
    assert keys.nth(0).evaluate("el => el.style.background") != ""
    assert keys.nth(4).evaluate("el => el.style.background") == ""      # weight 0: not highlighted
    assert "≈1.00 of its weight" in s.page.locator("#tok-note").inner_text()
    s.shot(tmp_path / "token-query.png")
    s.select(0, 1)
    s.page.hover('#klist .tok[data-pos="0"]')            # key 0 in the uniform head: query q gives it 1/(q+1)
    queries = s.page.locator("#qlist .tok")
    weights = [float(queries.nth(q).get_attribute("data-weight")) for q in range(len(TOKENS))]
    assert np.allclose(weights, [1 / (q + 1) for q in range(len(TOKENS))], atol=STEP01 / 2)
    s.shot(tmp_path / "token-key.png")
    s.assert_clean()


def test_cross_attention_layer_labels_its_keys(browser, small_page, tmp_path):
    s = Session(browser, small_page).wait_ready()
    s.select(1, 1)
    assert s.page.locator("#klist .lab").all_inner_texts() == CROSS_KEYS
    assert s.page.locator("#qlist .lab").all_inner_texts() == [shown(t) for t in TOKENS]
    assert s.page.locator("#batch-label").is_visible()             # two batch items: a selector
    readout = s.hover_cell(2, 4)
    assert f"query 2 «{shown(TOKENS[2])}» → key 4 «{CROSS_KEYS[4]}»" in readout
    s.page.select_option("#batch-select", "1")
    s.wait_drawn("1.1.1")
    rows = s.page.locator("#steps tbody tr")
    assert rows.count() == 4 and "0.30000000000000004" in rows.nth(0).inner_text()
    s.page.locator(".diags li.linked").click()                     # the diagnosis names layer 0, head 2
    s.wait_drawn("0.0.2")
    s.shot(tmp_path / "cross.png")
    s.assert_clean()


def test_dark_theme_draws_with_its_own_colours(browser, small_page, tmp_path):
    s = Session(browser, small_page, color_scheme="dark").wait_ready()
    background = s.page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in background[4:-1].split(",")) < 3 * 60, background
    assert close(s.pixel(0, 5), s.css_colour("--zero"))           # head 0, masked: the dark theme's zero
    s.page.hover('#qlist .tok[data-pos="4"]')
    s.shot(tmp_path / "dark.png")
    s.assert_clean()


def test_2048_tokens_12_heads_load_pool_and_switch(browser, tmp_path):
    path = tmp_path / "long.html"
    write_explorer(path, long_data(2048, 12))
    s = Session(browser, path).wait_ready()
    state = s.api("x.state()")
    f = state["pooled"]
    assert f > 1 and f"1 px = {f}×{f} tokens" in s.page.locator("#heat-caption").inner_text()
    readout = s.hover_cell(1000, 999)                    # head 0: one-hot on the previous token
    assert "block: queries" in readout and "query 1000 «tok1000» → key 999 «tok999» = 1.000" in readout
    s.page.select_option("#pool-select", "mean")         # the same block by its mean: 1 of 16 cells is 1.0
    mean_rgb = s.pixel(1000, 999)
    assert sum(mean_rgb) < sum(VIRIDIS_HIGH) - 150 and not close(mean_rgb, s.css_colour("--zero"))
    s.page.select_option("#pool-select", "max")
    s.select(0, 7)                                       # a head switch through the <select>
    s.api("x.select(0, 0)")
    s.api("x.zoom(1 / 64, 1000, 999)")                   # 32×32 tokens: single cells again
    state = s.api("x.state()")
    assert state["pooled"] == 1 and state["qStart"] <= 1000 < state["qStart"] + 32     # token view followed
    assert close(s.pixel(1000, 999), VIRIDIS_HIGH)
    assert close(s.pixel(1000, 1001), s.css_colour("--zero"))     # masked future key
    assert s.page.locator("#head-grid .head-btn").count() == 12
    s.wait_for("html[data-thumbs='0.0']")
    thumb = s.page.evaluate("[...document.querySelectorAll('#head-grid canvas')[0].getContext('2d')"
                            ".getImageData(63, 63, 1, 1).data].slice(0, 3)")
    assert close(thumb, VIRIDIS_HIGH)                   # head 0's thumbnail: the diagonal's last block is 1.0
    s.shot(tmp_path / "long.png")
    s.assert_clean()


def test_jupyter_fragment_runs_inside_its_iframe(browser, tmp_path):
    host = tmp_path / "notebook.html"
    fragment = explorer_iframe(small_data(), 900)
    host.write_text(f"<!DOCTYPE html><html><body><h1>cell output</h1>{fragment}</body></html>", encoding="utf-8")
    s = Session(browser, host)
    frame = s.page.frame_locator("iframe.attntrace-explorer")
    frame.locator("html[data-ready='true']").wait_for(timeout=LOAD_MS)
    inner = next(f for f in s.page.frames if f != s.page.main_frame)
    assert s.api("x.state().drawn", frame=inner) == "0.0.0"
    assert frame.locator("#klist .tok").count() == len(TOKENS)
    s.shot(tmp_path / "notebook.png")
    s.assert_clean()


def test_readme_screenshot(browser, small_page, tmp_path):
    """The README's picture: written to tmp_path, and to docs/ only when asked (ATTNTRACE_DOCS_SHOT=1)."""
    s = Session(browser, small_page).wait_ready()
    s.select(0, 1)
    s.page.set_viewport_size({"width": 1400, "height": 900})
    s.page.click('#qlist .tok[data-pos="5"]')            # pinned: its lines stay while the cursor reads a cell
    assert f"{quantised(1 / 7):.3f} ± 0.0020" in s.hover_cell(6, 2)
    target = tmp_path / "explorer.png"
    s.page.screenshot(path=str(target), full_page=False)
    if os.environ.get("ATTNTRACE_DOCS_SHOT") == "1":
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
        os.makedirs(docs, exist_ok=True)
        shutil.copy(target, os.path.join(docs, "explorer.png"))
    s.assert_clean()
