"""fastmnist serve in a real browser: Debian's headless Chromium, driven by Selenium, used as a person uses
the page: pen strokes on the canvas, clicks and keys, and what the page then shows.

Outside CI this file skips, saying why, where Chromium, its driver or Selenium is missing; under CI=true
that is a failure (.ci/run installs chromium and chromium-driver with apt-get).
"""
import base64
import json
import os
import re
import shutil
import tempfile

import pytest
import torch
from PIL import Image

from conftest import run_cli
from serve_support import CANVAS, digit_strokes, one_of_each_digit, running_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless, and nothing of the browser's own talks to the network: any request in its log is the page's.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
DESKTOP, PHONE = (1100, 1000), (390, 844)
pytestmark = pytest.mark.slow  # trains a model (conftest.trained_model)


def missing_browser():
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if absent:
        return f"{' and '.join(absent)} not found (apt-get install chromium chromium-driver)"
    if __import__("importlib").util.find_spec("fastapi") is None:
        return "the serve extra is not installed (pip install -e '.[serve]')"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    reason = missing_browser()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def url(trained_model):
    with running_server(trained_model) as (url, proc):
        yield url
    assert "Traceback" not in "".join(proc.stderr_lines), "".join(proc.stderr_lines)


@pytest.fixture(scope="module")
def driver(url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fastmnist-chromium-")
    for flag in FLAGS + (f"--user-data-dir={profile}", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        browser.set_window_size(*DESKTOP)
        browser.get(url)
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(driver, url):
    """The page, fresh, at desktop size. Afterwards its console must hold no error, and every request the
    browser made must have gone to this server (or be a data: or blob: URL): the page works offline."""
    driver.set_window_size(*DESKTOP)
    driver.get(url)
    wait_until(driver, lambda d: "Parameters" in d.find_element("id", "model").text, "the model's card")
    yield driver
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    requests = requested_urls(driver)
    assert any(u == url + "api/model" for u in requests), "the browser's network log is read"
    # chrome:// is the browser's own new-tab page, before the first get(): it never leaves the machine.
    outside = [u for u in requests if not u.startswith((url, "data:", "blob:", "chrome://"))]
    assert not outside, outside


def requested_urls(driver):
    """Every URL the browser requested since the last call (Chromium's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_until(driver, condition, what, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"waited {timeout} s for {what}")


def draw(driver, strokes, pointer="mouse"):
    """Draw the strokes (canvas units) on the canvas as pointer strokes: down, move, up, each one."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = driver.find_element("id", "pad")
    left, top, width = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width];", canvas)
    kind = {"mouse": interaction.POINTER_MOUSE, "touch": interaction.POINTER_TOUCH, "pen": interaction.POINTER_PEN}
    actions = ActionBuilder(driver, mouse=PointerInput(kind[pointer], pointer), duration=0)
    scale = width / CANVAS
    for x0, y0, x1, y1 in strokes:
        actions.pointer_action.move_to_location(round(left + x0 * scale), round(top + y0 * scale))
        actions.pointer_action.pointer_down()
        actions.pointer_action.move_to_location(round(left + x1 * scale), round(top + y1 * scale))
        actions.pointer_action.pointer_up()
    actions.perform()


def shown_answer(driver, strokes):
    """The digit the page shows once its answer is for all `strokes` strokes and nothing is in flight."""
    digit = driver.find_element("id", "digit")
    wait_until(driver, lambda d: d.execute_script("return document.body.dataset.state") == "idle"
               and digit.get_attribute("data-strokes") == str(strokes), f"the answer for {strokes} strokes")
    return digit.text


def canvas_is_blank(driver) -> bool:
    return driver.execute_script("""
        const c = document.getElementById('pad');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < px.length; i += 4) if (px[i] || px[i + 1] || px[i + 2]) return false;
        return true;""")


def clear(driver):
    driver.find_element("id", "clear").click()
    wait_until(driver, lambda d: d.find_element("id", "digit").text == "–", "the prediction to clear")


def test_drawn_digits_are_read(page, mnist, tmp_path_factory):
    """Ten test digits (one of each), traced from their pixels and drawn with the mouse (and with a finger
    and a pen for two of them): the page must show the right digit for at least 9."""
    page.execute_script(COUNT_REQUESTS)
    shown, labels = [], []
    for n, i in enumerate(one_of_each_digit(mnist.test_labels)):
        strokes = digit_strokes(mnist.test_images[i])
        draw(page, strokes, pointer={3: "touch", 7: "pen"}.get(n, "mouse"))
        shown.append(shown_answer(page, len(strokes)))
        labels.append(str(int(mnist.test_labels[i])))
        if n == 9:
            save_screenshot(page, tmp_path_factory)
        clear(page)
    print(f"the page read {shown} for {labels}")
    most, count = page.execute_script("return [window.mostInFlight, window.requestCount]")
    assert most == 1, "never more than one request in flight"
    assert 10 <= count < sum(len(digit_strokes(mnist.test_images[i])) for i in one_of_each_digit(mnist.test_labels)), \
        "live, but debounced: fewer requests than strokes"
    assert sum(s == y for s, y in zip(shown, labels)) >= 9, f"page showed {shown} for {labels}"


# Wraps the page's fetch to count the requests it makes and how many are out at once.
COUNT_REQUESTS = """
    window.mostInFlight = 0; window.requestCount = 0;
    let out = 0;
    const realFetch = window.fetch;
    window.fetch = async (...args) => {
      out++; window.requestCount++; window.mostInFlight = Math.max(window.mostInFlight, out);
      try { return await realFetch(...args); } finally { out--; }
    };"""


def save_screenshot(driver, tmp_path_factory):
    """A screenshot of the page with its answer, in the session's folder (and at $FASTMNIST_SCREENSHOT,
    where the README's docs/serve.png is made)."""
    path = tmp_path_factory.getbasetemp() / "serve.png"
    driver.save_screenshot(str(path))
    if os.environ.get("FASTMNIST_SCREENSHOT"):
        shutil.copy(path, os.environ["FASTMNIST_SCREENSHOT"])
    print(f"screenshot: {path}")


def test_clear_empties_the_canvas_and_the_prediction(page, mnist):
    strokes = digit_strokes(mnist.test_images[0])
    draw(page, strokes)
    assert shown_answer(page, len(strokes)) != "–" and not canvas_is_blank(page)
    assert page.find_element("id", "seen").is_displayed()
    clear(page)
    assert canvas_is_blank(page)
    assert page.find_element("id", "confidence").text == ""
    assert not page.find_element("id", "seen").is_displayed()
    assert not page.find_elements("css selector", "#bars li.winner")
    assert all(p.text == "" for p in page.find_elements("css selector", "#bars .pct"))


def test_undo_and_the_keyboard(page, mnist):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    strokes = digit_strokes(mnist.test_images[1])
    draw(page, strokes)
    shown_answer(page, len(strokes))
    page.find_element("id", "undo").click()
    shown_answer(page, len(strokes) - 1)
    ActionChains(page).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()  # Ctrl+Z: another
    shown_answer(page, len(strokes) - 2)
    ActionChains(page).send_keys(Keys.ESCAPE).perform()  # Escape clears
    wait_until(page, lambda d: canvas_is_blank(d) and d.find_element("id", "digit").text == "–", "Escape to clear")
    page.execute_script("document.getElementById('pad').focus()")
    focused = []
    for _ in range(3):  # from the canvas, Tab reaches every button
        ActionChains(page).send_keys(Keys.TAB).perform()
        focused.append(page.switch_to.active_element.get_attribute("id"))
    assert focused == ["undo", "clear", "upload"], focused


def test_upload_shows_what_fastmnist_predict_says(page, mnist, trained_model, tmp_path):
    """A photo-like PNG (dark ink on grey paper, off-centre) chosen with the file picker."""
    digit = mnist.test_images[one_of_each_digit(mnist.test_labels)[6]]
    big = torch.nn.functional.interpolate(digit[None, None].float(), scale_factor=5, mode="bilinear")[0, 0]
    photo = torch.nn.functional.pad(235 - 200 * big.clamp(0, 255) / 255, (30, 60, 10, 45), value=235)
    path = tmp_path / "photo.png"
    Image.fromarray(photo.round().to(torch.uint8).numpy(), "L").save(path)
    cli = run_cli("predict", "--checkpoint", str(trained_model), str(path))
    assert cli.returncode == 0, cli.stderr
    digit_said, p_said = re.search(r": (\d) \(p=([\d.]+)\)", cli.stdout).groups()

    page.find_element("id", "file").send_keys(str(path))
    out = page.find_element("id", "digit")
    wait_until(page, lambda d: out.get_attribute("data-source") == "photo.png"
               and d.execute_script("return document.body.dataset.state") == "idle", "the upload's answer")
    assert out.text == digit_said
    assert page.find_element("id", "confidence").text == f"p = {p_said}"

    clear(page)  # the same file dropped on the canvas (a drop of a file cannot be made with the pointer)
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const drop = new DataTransfer();
        drop.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("pad").dispatchEvent(new DragEvent("drop", { dataTransfer: drop, bubbles: true }));
        """, base64.b64encode(path.read_bytes()).decode())
    wait_until(page, lambda d: out.get_attribute("data-source") == "dropped.png"
               and d.execute_script("return document.body.dataset.state") == "idle", "the dropped file's answer")
    assert out.text == digit_said
    assert page.find_element("id", "confidence").text == f"p = {p_said}"


def test_the_page_fits_a_phone_and_still_reads_digits(page, mnist, tmp_path_factory):
    page.set_window_size(*PHONE)
    width, height, scroll_width, canvas_right, answer_bottom = page.execute_script(
        "return [window.innerWidth, window.innerHeight, document.documentElement.scrollWidth,"
        " document.getElementById('pad').getBoundingClientRect().right,"
        " document.getElementById('digit').getBoundingClientRect().bottom];")
    assert scroll_width <= width and canvas_right <= width, "no sideways scrolling on a phone"
    assert answer_bottom <= height, "the answer is in view under the canvas while one draws"
    i = one_of_each_digit(mnist.test_labels)[2]
    strokes = digit_strokes(mnist.test_images[i])
    draw(page, strokes, pointer="touch")
    assert shown_answer(page, len(strokes)) == str(int(mnist.test_labels[i]))
    page.save_screenshot(str(tmp_path_factory.getbasetemp() / "serve-phone.png"))
