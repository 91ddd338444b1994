"""A real Prometheus server on 127.0.0.1 for the metrics tests: the Debian binary, a throwaway config
and TSDB folder, started and stopped by its PID (never as a system service)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from tests.server_process import free_port, wait_until_healthy

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
INSTALL_HINT = "apt-get install -y prometheus (make test does it)"


class PrometheusProcess:
    """Scrapes one kvserve target every second as job "kvserve" and evaluates the given rule files.

    Usage: with PrometheusProcess("127.0.0.1:8000", rule_files) as prom: prom.value("up")
    """

    def __init__(self, target: str, rule_files: list[Path], startup_timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="kvserve-prometheus-"))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(path) for path in rule_files],
                  "scrape_configs": [{"job_name": "kvserve", "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [target]}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrometheusProcess:
        log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        if not wait_until_healthy(self.proc, self.url + "/-/ready", self.startup_timeout, "prometheus", self.log):
            self.stop()
            raise RuntimeError(f"prometheus not ready after {self.startup_timeout} s:\n{self.log()}")
        return self

    def log(self) -> str:
        return (self.dir / "prometheus.log").read_text()

    def api(self, path: str, **params) -> dict | list:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for_scrape(self, after: float, timeout: float = 20.0) -> None:
        """Until a successful scrape that started after `after` (time.time()) is queryable."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stamp = self.value('timestamp(up{job="kvserve"})')
            if stamp is not None and stamp > after and self.value('up{job="kvserve"}') == 1:
                return
            time.sleep(0.2)
        raise AssertionError(f"no successful scrape after {after} within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
