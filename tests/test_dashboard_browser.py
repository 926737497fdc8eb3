"""The dashboard in a real headless browser (Debian's chromium through Selenium): the page loads, shows a round
appearing while a real (tiny) run is in progress, and logs no console errors.

The run is stepped: a sink holds the coordinator after each round until the test has looked at the page.
Skipped, saying why, where chromium or chromedriver is missing (scripts/test.sh installs them as root).
``FEDTUNE_SCREENSHOT=docs/img/dashboard.png`` also saves the page as it looks after the last round.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from rich.console import Console

from _models import DIGITS_CNN
from fedtune.config.load import parse_config
from fedtune.dashboard.server import DashboardSink
from fedtune.run.session import simulate
from fedtune.run.sinks import BaseSink

ROUNDS = 3
WAIT_S = 120  # generous: the machine may be busy; every wait ends as soon as the page shows what it should


def chrome(user_data: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install 'fedtune[test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        f"--user-data-dir={user_data}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    return webdriver.Chrome(options=opts, service=Service(driver_path))


class Gate(BaseSink):
    """Holds the coordinator after each round until the test lets it go on."""

    def __init__(self) -> None:
        self.reached: dict[int, threading.Event] = {r: threading.Event() for r in range(ROUNDS + 1)}
        self.go: dict[int, threading.Event] = {r: threading.Event() for r in range(ROUNDS + 1)}

    def on_round(self, state, records) -> None:
        self.reached[state.round].set()
        if not self.go[state.round].wait(timeout=WAIT_S * 3):
            raise TimeoutError(f"the test never released round {state.round}")


def test_dashboard_shows_rounds_live_without_console_errors(tmp_path) -> None:
    driver = chrome(Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 4}},
        "federation": {"rounds": ROUNDS, "clients_per_round": 3},
        "client": {"local_steps": 10, "batch_size": 16, "lr": 0.5, "optimizer": "sgd"},
        "run": {"out_dir": str(tmp_path / "runs"), "name": "digits-demo", "plot": False},
    }
    gate, dash = Gate(), DashboardSink(Console(file=io.StringIO()), port=0)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = simulate(
                parse_config(cfg), console=Console(file=io.StringIO()), show_progress=False, sinks=[dash, gate]
            )
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err
            for event in gate.reached.values():
                event.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.2)
        assert gate.reached[0].wait(WAIT_S) and "error" not in outcome, outcome.get("error")  # the baseline
        driver.get(dash.dashboard.url)
        text = lambda id_: driver.find_element(By.ID, id_).text  # noqa: E731
        wait.until(lambda d: text("c-round") == f"0 / {ROUNDS}")
        assert text("state") == "running"
        for r in (1, 2):
            gate.go[r - 1].set()
            assert gate.reached[r].wait(WAIT_S) and "error" not in outcome, outcome.get("error")
            wait.until(lambda d, r=r: text("c-round") == f"{r} / {ROUNDS}")  # the round appeared, live
            # the loss chart has a line, the client table a row per client with its state
            assert driver.find_elements(By.CSS_SELECTOR, "#chart-loss path")
            rows = driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr")
            assert len(rows) == 4 and {row.find_elements(By.TAG_NAME, "td")[1].text for row in rows} <= {
                "idle",
                "training",
                "evaluating",
            }
        assert text("c-clients") == "4 / 4" and text("c-eta") not in ("", "-")
        gate.go[2].set()
        assert gate.reached[ROUNDS].wait(WAIT_S) and "error" not in outcome, outcome.get("error")
        wait.until(lambda d: text("c-round") == f"{ROUNDS} / {ROUNDS}")
        if os.environ.get("FEDTUNE_SCREENSHOT"):
            driver.save_screenshot(os.environ["FEDTUNE_SCREENSHOT"])
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == [], errors
        gate.go[ROUNDS].set()
        thread.join(WAIT_S)
        assert "error" not in outcome, outcome.get("error")
        assert (outcome["result"].run_dir / "report.html").is_file()
    finally:
        for event in gate.go.values():
            event.set()
        driver.quit()
