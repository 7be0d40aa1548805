"""The web page at GET / of the Serve app, end to end in headless Chromium (Debian's chromium + chromedriver):
pick the astronaut photo, submit, a generated image, the fusion mask and identity scores appear (also with a
reference mode picked); a file that is not an image shows the API's error message in plain words. Uses the session's Serve app (tests/serve_fixtures.py).
"""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from serve_fixtures import service  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _fill_and_submit(driver, url: str, photo_path: str, prompt: str = "a man <|image|> on the moon") -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    prompt_box = driver.find_element(By.ID, "prompt")
    prompt_box.clear()
    prompt_box.send_keys(prompt)
    pickers = driver.find_elements(By.CSS_SELECTOR, "input.reference")
    assert len(pickers) == prompt.count("<|image|>")  # one picker per marker
    for picker in pickers:
        picker.send_keys(photo_path)
    for field, value in (("steps", "3"), ("seed", "5")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "submit").click()


def test_page_generates_from_an_uploaded_photo_and_shows_api_errors(service, browser, astronaut, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = service["url"]
    page = service["client"].get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http" not in page.text.split("<script", 1)[1]  # nothing fetched from elsewhere

    # The pickers follow the number of markers in the prompt.
    from selenium.webdriver.common.keys import Keys

    browser.get(url + "/")
    prompt_box = browser.find_element(By.ID, "prompt")
    prompt_box.send_keys(Keys.END, " with a woman <|image|> and a child <|image|>")
    assert len(browser.find_elements(By.CSS_SELECTOR, "input.reference")) == 3

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut).save(photo, quality=90)
    _fill_and_submit(browser, url, str(photo))
    wait = WebDriverWait(browser, 240)
    image = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#images img.generated")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 128  # the tiny model's size
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert browser.find_elements(By.CSS_SELECTOR, "#mask img")  # the fusion mask
    score_cells = browser.find_elements(By.CSS_SELECTOR, "#scores tr:nth-child(2) td")
    assert len(score_cells) == 2  # image number + person 1
    assert "total" in browser.find_element(By.ID, "timings").text

    # Two photos of one person and a box: the overlay comes back with the box drawn, the manifest line counts photos.
    flipped = tmp_path / "astronaut-flipped.jpg"
    Image.fromarray(astronaut[:, ::-1].copy()).save(flipped, quality=90)
    browser.get(url + "/")
    browser.find_element(By.CSS_SELECTOR, "input.reference").send_keys(f"{photo}\n{flipped}")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pickers .previews img")) == 2
    browser.find_element(By.CSS_SELECTOR, "input.box").send_keys("0, 0, 0.5, 1")
    Select(browser.find_element(By.ID, "reference_mode")).select_by_value("face")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    browser.find_element(By.ID, "submit").click()
    overlay = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#overlays img.overlay")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert "person 1: 2 photo(s)" in browser.find_element(By.ID, "manifest").text
    assert "boxes [[0,0,0.5,1]]" in browser.find_element(By.ID, "manifest").text
    assert "(photo use: face)" in browser.find_element(By.ID, "manifest").text

    # A file that is not an image: the API's message, in words, on the page.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a photo")
    _fill_and_submit(browser, url, str(text_file))
    error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
    assert "422" in error.text and "reference 1" in error.text, error.text
