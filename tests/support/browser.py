"""The one selenium adapter of the tests: Debian's chromium, headless, through Debian's
chromedriver (no browser download). ``browser()`` is None when either is missing."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists() and Path(DRIVER).exists()


class Browser:
    def __init__(self, width: int = 412, height: int = 915) -> None:  # a phone
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--ignore-certificate-errors", f"--window-size={width},{height}",
                    "--no-first-run", "--disable-extensions"):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        self.driver.set_script_timeout(10)

    def get(self, url: str) -> None:
        self.driver.get(url)

    def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def visible(self, css: str) -> bool:
        from selenium.webdriver.common.by import By

        els = self.driver.find_elements(By.CSS_SELECTOR, css)
        return bool(els) and bool(els[0].is_displayed())

    def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        el = self.driver.find_element(By.CSS_SELECTOR, css)
        el.clear()
        el.send_keys(text)

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def wait(self, cond: Callable[[], Any], timeout: float = 10.0) -> Any:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(NoSuchElementException,
                                                 StaleElementReferenceException)
                             ).until(lambda _d: cond())

    def fetch(self, path: str, body: Any, headers: dict[str, str]) -> Any:
        """A POST from the page's own origin (its cookies), answered as {status, body}."""
        return self.driver.execute_async_script(
            "const [p, b, h, done] = arguments;"
            "fetch(p, {method: 'POST', headers: h, body: JSON.stringify(b),"
            " credentials: 'same-origin'})"
            ".then(async r => done({status: r.status, body: await r.json()}))"
            ".catch(e => done({status: 0, body: String(e)}));", path, body, headers)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    def pid(self) -> int:
        service = self.driver.service
        proc = service.process
        return int(proc.pid) if proc is not None else 0

    def close(self) -> None:
        self.driver.quit()
