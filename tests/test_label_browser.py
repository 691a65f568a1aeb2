"""End to end in a real headless browser: Debian's chromium driven by playwright labels three items
with the mouse and the keyboard against `rlhf-ext label serve` on 127.0.0.1, and the database is
checked. The setup installs chromium with tests/setup_browser.sh when it is missing (root + apt only);
the test skips, saying why, where that is impossible."""

import os
import re
import sqlite3
import subprocess

import pytest

pytest.importorskip("uvicorn", reason="needs the 'label' extra: pip install 'rlhf_ext[label]'")
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="needs playwright: pip install playwright (the 'dev' extra); the browser itself is Debian's chromium",
)

from tests.label_helpers import REPO_ROOT, label_server, write_pairs  # noqa: E402

expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
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
TOKEN = "browser-test-token"
INJECTION = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold?</b>'
ITEMS = [
    ("inj", INJECTION, "safe answer", INJECTION + "</pre><script>window.pwned=3</script>"),
    ("two", "Name a colour.", "Blue.", "A colour is a hue."),
    ("three", "Add 2 and 2.", "4", "22"),
    ("four", "Unused.", "x", "y"),
]


@pytest.fixture(scope="module")
def chromium_path():
    if not os.path.exists(CHROMIUM):
        subprocess.run(["bash", os.path.join(REPO_ROOT, "tests", "setup_browser.sh")], check=False, timeout=600)
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} is missing and tests/setup_browser.sh could not install it (it needs root and apt-get)"
        )
    return CHROMIUM


WAIT_MS = 15000


def wait_for_new_prompt(page, old_prompt):
    """Waits with a locator assertion (it polls from playwright's side): a string predicate would be evaluated
    in the page, which the app's Content-Security-Policy forbids ('unsafe-eval')."""
    expect(page.locator("#prompt")).not_to_have_text(re.compile("^" + re.escape(old_prompt) + "$"), timeout=WAIT_MS)
    expect(page.locator("#prompt")).to_have_text(re.compile(".+"), timeout=WAIT_MS)


def shown(page):
    return {
        key: page.text_content(sel)
        for key, sel in (("prompt", "#prompt"), ("a", "#completion-a"), ("b", "#completion-b"))
    }


def test_label_three_items_with_mouse_and_keyboard(tmp_path, chromium_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", ITEMS)
    db = tmp_path / "fb.sqlite"
    texts = {item_id: (a, b) for item_id, _, a, b in ITEMS}
    with label_server(pairs, db, k=1, extra=("--token", TOKEN)) as (_, base), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/?token={TOKEN}")
            page.fill("#name-input", "Ann Example")
            page.click("#start")
            expect(page.locator("#prompt")).to_have_text(re.compile(".+"), timeout=WAIT_MS)

            # item 1: hostile markup shows as text and runs nothing
            first = shown(page)
            assert first["prompt"] == INJECTION and set(texts["inj"]) == {first["a"], first["b"]}
            assert page.evaluate("window.pwned") is None and dialogs == []
            assert page.locator("main img, main script, main b").count() == 0
            # mouse: rating 6, a note, then "B is better"
            page.click("#rating-6")
            page.fill("#note", "B looks <b>odd</b>")
            page.click("#choose-b")
            wait_for_new_prompt(page, first["prompt"])

            # item 2: keys typed into the note are text, not votes; Escape leaves the note, "1" votes A
            second = shown(page)
            page.fill("#note", "")
            page.type("#note", "2 t s")
            page.keyboard.press("Escape")
            assert page.text_content("#prompt") == second["prompt"]
            page.keyboard.press("1")
            wait_for_new_prompt(page, second["prompt"])

            # item 3: "t" is a tie
            third = shown(page)
            page.keyboard.press("t")
            wait_for_new_prompt(page, third["prompt"])
            expect(page.locator("#progress")).to_have_text(re.compile("^3 labelled"), timeout=WAIT_MS)
            assert page.evaluate("window.pwned") is None and dialogs == []
        finally:
            browser.close()

        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT item_id, labeller, choice, swapped, rating, note FROM votes ORDER BY created_at"
            ).fetchall()
    assert [r[0] for r in rows] == ["inj", "two", "three"]
    assert all(r[1] == "Ann Example" for r in rows)
    # canonical choices follow from what was on screen: the side clicked and which completion was there
    inj_b_shown = first["b"]
    assert rows[0][2] == ("a" if inj_b_shown == texts["inj"][0] else "b")
    assert rows[0][3] == int(first["a"] == texts["inj"][1])
    assert rows[0][4:] == (6, "B looks <b>odd</b>")
    assert rows[1][2] == ("a" if second["a"] == texts["two"][0] else "b")
    assert rows[1][4:] == (None, "2 t s")
    assert rows[2][2] == "tie"
