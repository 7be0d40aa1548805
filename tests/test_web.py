"""The web page at GET / of the Serve app, end to end in headless Chromium (Debian's chromium + chromedriver).

It submits through the job API (POST /v1/jobs, then the job's Server-Sent Events): the progress bar names the
stages and reaches the last step, a preview appears (steps 8 with the server's preview_every 5: one at step 5), then
the image, the fusion mask and identity scores; two runs with different seeds sit in the strip and can be shown side
by side; boxes dragged on the layout canvas fill the coordinates fields (typed ones show on the canvas); Cancel on a
job queued behind others ends in "cancelled"; an API error is shown in plain words. Uses the session's Serve app
(tests/serve_fixtures.py: max_steps 8, max_side 128).
"""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
STAGES = ("scene", "fusion", "subjects")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo(astronaut, tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    Image.fromarray(astronaut).save(path, quality=90)
    return path


def _set(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def _fill_and_submit(
    driver, url: str, photo_path: str, prompt: str = "a man <|image|> on the moon", steps: int = 8, seed: int = 5
) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    _set(driver, "prompt", prompt)
    pickers = driver.find_elements(By.CSS_SELECTOR, "input.reference")
    assert len(pickers) == prompt.count("<|image|>")  # one picker per marker
    for picker in pickers:
        picker.send_keys(photo_path)
    _set(driver, "steps", str(steps))
    _set(driver, "seed", str(seed))
    driver.find_element(By.ID, "submit").click()


def _loaded(wait, image) -> None:
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))


def test_page_follows_a_job_to_its_result_and_keeps_a_strip(service, browser, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url = service["url"]
    page = service["client"].get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http" not in page.text.split("<script", 1)[1]  # nothing fetched from elsewhere

    # The pickers follow the number of markers in the prompt.
    browser.get(url + "/")
    browser.find_element(By.ID, "prompt").send_keys(Keys.END, " with a woman <|image|> and a child <|image|>")
    assert len(browser.find_elements(By.CSS_SELECTOR, "input.reference")) == 3

    _fill_and_submit(browser, url, str(photo), steps=8, seed=5)
    wait = WebDriverWait(browser, 240)
    image = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#images img.generated")))
    _loaded(wait, image)
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 128  # the tiny model's size
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None

    # The progress bar: one cell per step, each named by its stage, starting in the scene stage; the text ends at 8/8.
    progress = browser.find_element(By.ID, "progress-text").text
    assert progress.startswith("step 8/8 · ") and progress.split(" · ")[1] in STAGES and progress.endswith("done")
    stages = [cell.get_attribute("data-stage") for cell in browser.find_elements(By.CSS_SELECTOR, "#bar .cell")]
    assert len(stages) == 8 and stages[0] == "scene" and set(stages) <= set(STAGES), stages
    assert stages == sorted(stages, key=STAGES.index)  # scene → fusion → subjects, never back
    assert browser.find_element(By.ID, "stages").text.split() == ["scene", "→", "fusion", "→", "subjects"]
    # The preview of step 5 (the last step's picture is the result itself, so it stays the one shown).
    preview = browser.find_element(By.CSS_SELECTOR, "#preview img.preview")
    _loaded(wait, preview)
    assert "step 5" in browser.find_element(By.ID, "preview-caption").text
    assert browser.find_elements(By.CSS_SELECTOR, "#mask img")  # the fusion mask
    score_cells = browser.find_elements(By.CSS_SELECTOR, "#scores tr:nth-child(2) td")
    assert len(score_cells) == 3 and score_cells[2].text == "none"  # image number, person 1, the blend guard's
    assert "total" in browser.find_element(By.ID, "timings").text
    assert browser.find_element(By.ID, "cancel").get_attribute("disabled") is not None  # nothing left to cancel

    # A second run with another seed, best of 2: both are in the strip; the first is shown next to the newest.
    _set(browser, "seed", "6")
    _set(browser, "best_of", "2")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#strip figure.run")) == 2)
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#strip figure.run figcaption")]
    assert "seed 5 · 8 steps" in captions[0] and "seed 6 · 8 steps" in captions[1], captions
    assert (
        "best of 2" in captions[1]
        and "best of 2 candidates (seeds 6, 7)" in browser.find_element(By.ID, "manifest").text
    )
    assert browser.find_element(By.CSS_SELECTOR, "#scores tr:nth-child(2) td:last-child").text == "none"
    assert "Run 2" in browser.find_element(By.ID, "images-title").text
    browser.find_elements(By.CSS_SELECTOR, "#strip figure.run")[0].click()
    compared = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#compare img")))
    _loaded(wait, compared)
    assert browser.find_element(By.ID, "compare-title").text == "Run 1"
    assert "seed 5" in browser.find_element(By.ID, "compare-caption").text
    assert browser.find_element(By.CSS_SELECTOR, "#images img.generated").is_displayed()  # side by side

    # Two photos of one person, a typed box and a photo use: the overlay comes back with the box drawn, the
    # manifest line counts photos.
    flipped = photo.parent / "astronaut-flipped.jpg"
    Image.open(photo).transpose(Image.FLIP_LEFT_RIGHT).save(flipped, quality=90)
    browser.get(url + "/")
    browser.find_element(By.CSS_SELECTOR, "input.reference").send_keys(f"{photo}\n{flipped}")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pickers .previews img")) == 2
    browser.find_element(By.CSS_SELECTOR, "input.box").send_keys("0, 0, 0.5, 1")
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "reference_mode")).select_by_value("face")
    _set(browser, "steps", "3")
    browser.find_element(By.ID, "submit").click()
    overlay = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#overlays img.overlay")))
    _loaded(wait, overlay)
    manifest = browser.find_element(By.ID, "manifest").text
    assert "person 1: 2 photo(s)" in manifest and "boxes [[0,0,0.5,1]]" in manifest and "(photo use: face)" in manifest

    # A file that is not an image: the API's message, in words, on the page (no stack trace).
    text_file = photo.parent / "notes.txt"
    text_file.write_text("this is not a photo")
    _fill_and_submit(browser, url, str(text_file), steps=3)
    error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("Error (") and "reference 1" in error.text, error.text
    assert "Traceback" not in error.text and 'File "' not in error.text
    assert browser.find_element(By.ID, "submit").get_attribute("disabled") is None  # ready for the next try


def test_boxes_dragged_on_the_canvas_fill_the_coordinates(service, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(service["url"] + "/")
    _set(browser, "prompt", "a man <|image|> and a woman <|image|> in a park")
    canvas = browser.find_element(By.ID, "layout")
    # The canvas has the output size: the model's side from /v1/info (128 here), then the typed width and height.
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].width", canvas) == 128)
    _set(browser, "width", "96")
    assert browser.execute_script("return [arguments[0].width, arguments[0].height]", canvas) == [96, 128]
    _set(browser, "width", "")

    def drag(start, end):  # fractions of the canvas; Selenium's offsets count from the element's centre
        width, height = canvas.size["width"], canvas.size["height"]
        at = lambda f: (round((f[0] - 0.5) * width), round((f[1] - 0.5) * height))  # noqa: E731
        (x0, y0), (x1, y1) = at(start), at(end)
        ActionChains(browser).move_to_element_with_offset(canvas, x0, y0).click_and_hold().move_by_offset(
            (x1 - x0) // 2, (y1 - y0) // 2
        ).move_by_offset(x1 - x0 - (x1 - x0) // 2, y1 - y0 - (y1 - y0) // 2).release().perform()

    def boxes():
        return [
            [float(v) for v in field.get_attribute("value").split(",")] if field.get_attribute("value") else None
            for field in browser.find_elements(By.CSS_SELECTOR, "input.box")
        ]

    drag((0.1, 0.2), (0.6, 0.9))
    first = boxes()[0]
    assert first == pytest.approx([0.1, 0.2, 0.6, 0.9], abs=0.02) and boxes()[1] is None
    drag((0.9, 0.8), (0.5, 0.1))  # dragged up and left: still x0 < x1, y0 < y1; the next person's box
    assert boxes()[1] == pytest.approx([0.5, 0.1, 0.9, 0.8], abs=0.02) and boxes()[0] == first

    def painted(fx, fy):  # alpha of the canvas pixel at these fractions (the background is transparent)
        return browser.execute_script(
            "const c = arguments[0]; const x = Math.min(c.width - 1, Math.round(arguments[1] * c.width));"
            "const y = Math.min(c.height - 1, Math.round(arguments[2] * c.height));"
            "return c.getContext('2d').getImageData(x, y, 1, 1).data[3];",
            canvas,
            fx,
            fy,
        )

    assert painted(0.1, 0.5) > 0 and painted(0.3, 0.5) == 0  # person 1's left edge is drawn, inside is empty
    # Typed coordinates still work and show on the canvas.
    field = browser.find_elements(By.CSS_SELECTOR, "input.box")[0]
    field.clear()
    field.send_keys("0.25, 0.25, 0.75, 0.75")
    assert painted(0.25, 0.5) > 0 and painted(0.1, 0.5) == 0
    browser.find_element(By.ID, "clear-boxes").click()
    assert boxes() == [None, None] and painted(0.25, 0.5) == 0


def test_cancel_ends_a_queued_or_running_job(service, browser, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, url = service["client"], service["url"]
    # Keep the sampler busy so the page's job is still queued or running when Cancel is clicked.
    blockers = []
    try:
        for seed in range(4):
            answer = client.post(
                "/v1/jobs",
                json={
                    "prompt": "a man <|image|> on a beach",
                    "seed": 100 + seed,
                    "references": [service["reference"]],
                    "steps": 8,
                    "num_images": 4,
                },
            )
            assert answer.status_code == 202, answer.text
            blockers.append(answer.json()["id"])
        _fill_and_submit(browser, url, str(photo), steps=8, seed=9)
        wait = WebDriverWait(browser, 60)
        cancel = browser.find_element(By.ID, "cancel")
        wait.until(lambda d: cancel.get_attribute("disabled") is None)  # the job exists
        before = browser.find_element(By.ID, "progress-text").text
        cancel.click()
        wait.until(lambda d: "cancelled" in d.find_element(By.ID, "progress-text").text)
        assert before.startswith(("queued", "started", "step")), before
        job_id = browser.execute_script("return job.id")
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        assert not browser.find_elements(By.CSS_SELECTOR, "#strip figure.run")  # a cancelled job is no result
        assert browser.find_element(By.ID, "submit").get_attribute("disabled") is None
    finally:
        for job_id in blockers:  # leave the session's app idle for the tests after this one
            client.delete(f"/v1/jobs/{job_id}")
