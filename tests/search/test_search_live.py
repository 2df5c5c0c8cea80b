"""mmpt serve for real: uvicorn in a subprocess, a bounded load test with 8 concurrent clients, and the web
page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium; nothing downloaded)."""

from __future__ import annotations

import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from searchkit import start_server

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def server(search_env):  # noqa: ANN001, ANN201
    proc, url = start_server(search_env.model, search_env.index)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _jpg(search_env, key: str) -> bytes:  # noqa: ANN001
    for shard in sorted(search_env.shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            try:
                return tar.extractfile(f"{key}.jpg").read()
            except KeyError:
                continue
    raise KeyError(key)


def test_load_eight_clients(server: str, search_env) -> None:  # noqa: ANN001
    """96 queries (typed text, typed protein, image uploads) from 8 concurrent clients within 60 s: no error,
    none lost, each answer equal to the same query asked alone (batching mixes no results up)."""
    import httpx

    queries = []
    for i in range(96):
        key = f"eval_{i % 48:08d}"
        if i % 3 == 0:
            queries.append(({"modality": "text", "text": f"a shape number {i}", "k": "5"}, None))
        elif i % 3 == 1:
            queries.append(({"modality": "protein", "text": "MKV" + "ACDEFGHIKLMNPQRSTVWY"[i % 20] * 5, "k": "5",
                             "target": "text"}, None))
        else:
            queries.append(({"modality": "image", "k": "5", "target": "image"}, {"file": ("q.jpg", _jpg(search_env, key))}))

    def ask(client: httpx.Client, q: tuple) -> list[int]:
        r = client.post(server + "api/search", data=q[0], files=q[1], timeout=30)
        assert r.status_code == 200, r.text
        return [h["id"] for h in r.json()["hits"]]

    with httpx.Client() as c:
        alone = [ask(c, q) for q in queries[:24]]
        before = c.get(server + "api/stats").json()

    def client_run(worker: int) -> list[tuple[int, list[int]]]:
        with httpx.Client() as c:
            return [(i, ask(c, queries[i])) for i in range(worker, len(queries), 8)]

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = dict(a for part in pool.map(client_run, range(8)) for a in part)
    took = time.monotonic() - start
    assert sorted(answers) == list(range(96)) and took < 60, took
    for i in range(24):  # every query type asked alone first: concurrent batches return the same hits
        assert answers[i] == alone[i], i
    with httpx.Client() as c:
        stats = c.get(server + "api/stats").json()
    assert stats["queries"] - before["queries"] == 96
    assert stats["batches"] - before["batches"] < 96  # some queries shared a forward pass


@pytest.mark.skipif(not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()),
                    reason="needs Debian's chromium + chromium-driver (apt-get install chromium chromium-driver; "
                           ".ci/run installs them)")
def test_page_in_headless_chromium(server: str, search_env, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "modality")).options) == 5)
        # a typed text query over every modality: each hit shown as what it is
        box = driver.find_element(By.ID, "text")
        box.send_keys("a red circle")
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("40")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") == "1")
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert len(cards) == 40
        shown = {"image": "img", "audio": "audio", "point_cloud": "canvas", "protein": "pre", "text": "pre"}
        for card in cards:
            tag = shown[card.get_attribute("data-modality")]
            assert card.find_elements(By.TAG_NAME, tag), card.get_attribute("outerHTML")[:300]
        # the same query against point clouds only: drawn projections
        Select(driver.find_element(By.ID, "target")).select_by_value("point_cloud")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") == "2")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .hit canvas")) == 40
        # an image upload: the file picks the image modality
        query = tmp_path / "query.jpg"
        query.write_bytes(_jpg(search_env, "eval_00000003"))
        driver.find_element(By.ID, "file").send_keys(str(query))
        assert Select(driver.find_element(By.ID, "modality")).first_selected_option.text == "image"
        Select(driver.find_element(By.ID, "target")).select_by_value("image")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") == "3")
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert cards and {c.get_attribute("data-modality") for c in cards} == {"image"}
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert "hits in" in driver.find_element(By.ID, "status").text
        shot = tmp_path / "search_page.png"
        driver.get_screenshot_as_file(str(shot))
        assert shot.stat().st_size > 10_000
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "search_page.png")
    finally:
        driver.quit()
