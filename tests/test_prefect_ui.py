"""What a user sees in the Prefect UI after a pipeline run, in a real browser.

A real `prefect server` on a free loopback port, the `pipeline` flow on tiny synthetic cases plus
one broken ZIP (run by the CLI in a subprocess, as a user would), then headless Chromium on the
flow run, the quarantined case's task run and the artifacts. Debian's `chromium` and
`chromium-driver` are used as installed: nothing is downloaded at run time. Screenshots are left
in the test's tmp folder.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pipeline_fixtures import tiny_pipeline_config
from prefect_server import prefect_server

from ctdiff.synth import SynthSpec, synthesize

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
METHODS = ("nearest", "linear", "cubic", "model", "vae_ceiling")
BROKEN = "broken"  # the case id of the garbage ZIP
RENDER_TIMEOUT_S = 30


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server with its own database; yields (base URL, env for clients)."""
    _require_browser()
    root = tmp_path_factory.mktemp("prefect-ui")
    with prefect_server(root, PREFECT_LOCAL_STORAGE_PATH=str(root / "results")) as (api_url, env):
        yield api_url.removesuffix("/api"), env


@pytest.fixture(scope="module")
def pipeline_run(server, tmp_path_factory):
    """The `pipeline` CLI on four tiny cases and one garbage ZIP, against the server."""
    url, env = server
    root = tmp_path_factory.mktemp("pipeline-ui")
    good = synthesize(root / "cases", SynthSpec(n_cases=4, size=32, n_thin=20, seed=2))
    (good[0].parent / f"{BROKEN}.zip").write_bytes(b"not a zip at all" * 64)
    path = tiny_pipeline_config(root, {"train": 0.5, "val": 0.25, "test": 0.25})
    ctdiff = Path(sys.executable).with_name("ctdiff")
    done = subprocess.run([str(ctdiff), "pipeline", "--config", str(path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return _Api(f"{url}/api")


class _Api:
    """The few REST reads the test needs (ids to build UI addresses from)."""

    def __init__(self, api_url: str) -> None:
        self.url = api_url

    def _post(self, path: str, body: dict) -> list[dict]:
        response = httpx.post(f"{self.url}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_name: str) -> dict:
        runs = self._post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "limit": 1,
                                                "sort": "START_TIME_DESC"})
        assert runs, f"no {flow_name} flow run"
        return runs[0]

    def task_run(self, name: str) -> dict:
        runs = self._post("/task_runs/filter", {"task_runs": {"name": {"any_": [name]}}, "limit": 1})
        assert runs, f"no task run {name}"
        return runs[0]

    def artifact(self, key: str) -> dict:
        found = self._post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 1,
                                                 "sort": "CREATED_DESC"})
        assert found, f"no artifact {key}"
        return found[0]


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager then downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(RENDER_TIMEOUT_S)
    yield driver
    driver.quit()


def _show(driver, url: str, *texts: str, shot: Path) -> str:
    """Open `url`, wait until the page shows every text, screenshot it; returns the page text."""
    driver.get(url)
    return _wait_for(driver, *texts, shot=shot)


def _wait_for(driver, *texts: str, shot: Path) -> str:
    """Wait until the current page shows every text, screenshot it; returns the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        WebDriverWait(driver, RENDER_TIMEOUT_S, poll_frequency=0.5).until(lambda d: all(t in body() for t in texts))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        missing = [t for t in texts if t not in body()]
        pytest.fail(f"{driver.current_url} never showed {missing} (screenshot {shot}); page text:\n{body()[:2000]}")
    time.sleep(1)  # let late widgets (charts, state badges) settle before the screenshot
    driver.save_screenshot(str(shot))
    return body()


def test_pipeline_flow_run_page(server, pipeline_run, browser, tmp_path):
    url, _ = server
    run = pipeline_run.flow_run("pipeline")
    assert run["state"]["name"] == "Completed"
    _show(browser, f"{url}/runs/flow-run/{run['id']}", run["name"], "Completed", shot=tmp_path / "pipeline.png")


def test_quarantined_case_task_run_is_named_quarantined(server, pipeline_run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    task_run = pipeline_run.task_run(f"ingest-{BROKEN}")
    assert task_run["state"]["type"] == "COMPLETED" and task_run["state"]["name"] == "Quarantined"
    _show(browser, f"{url}/runs/task-run/{task_run['id']}", f"ingest-{BROKEN}", "Quarantined",
          shot=tmp_path / "task-run-quarantined.png")
    # The ingest-cases flow run lists it among its task runs with the same state name.
    ingest = pipeline_run.flow_run("ingest-cases")
    _show(browser, f"{url}/runs/flow-run/{ingest['id']}", ingest["name"], shot=tmp_path / "ingest.png")
    tabs = [e for e in browser.find_elements(By.XPATH, "//*[normalize-space(.)='Task Runs']") if e.is_displayed()]
    tabs[-1].click()  # the innermost element with that label; the click reaches the tab
    _wait_for(browser, "ingest-case_000", f"ingest-{BROKEN}", "Quarantined", shot=tmp_path / "ingest-task-runs.png")


def test_manifest_table_artifact(server, pipeline_run, browser, tmp_path):
    url, _ = server
    artifact = pipeline_run.artifact("preprocess-cases")
    ids = [row["id"] for row in _rows(artifact)]
    assert BROKEN in ids and len(ids) == 5
    _show(browser, f"{url}/artifacts/artifact/{artifact['id']}", *ids, "ok", "quarantined",
          shot=tmp_path / "artifact-manifest.png")


def test_metrics_table_artifact(server, pipeline_run, browser, tmp_path):
    url, _ = server
    artifact = pipeline_run.artifact("evaluate-metrics")
    _show(browser, f"{url}/artifacts/artifact/{artifact['id']}", *METHODS, shot=tmp_path / "artifact-metrics.png")


def test_report_markdown_renders(server, pipeline_run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    artifact = pipeline_run.artifact("evaluate-report")
    text = _show(browser, f"{url}/artifacts/artifact/{artifact['id']}", "cubic", shot=tmp_path / "artifact-report.png")
    # Rendered, not shown as source: the methods table is an HTML table, and no Markdown syntax
    # (table rules, pipes, heading hashes) is left in the visible text.
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert any(all(method in table.text for method in METHODS) for table in tables), "no rendered methods table"
    assert "|---" not in text and "| nearest" not in text and "\n#" not in text


def _rows(artifact: dict) -> list[dict]:
    import json

    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data
