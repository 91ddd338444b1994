"""Run the app under uvicorn, draining in-flight requests on SIGTERM before exiting."""
from __future__ import annotations

import logging
import threading
import time

import uvicorn

from service.api.app import create_app
from service.settings import Settings

log = logging.getLogger("kvserve.server")


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: stop admitting (503), let running requests finish for up to
    drain_timeout seconds, abort the rest (finish_reason "abort"), then exit. A second one exits now."""

    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.state.engine is None:
            return super().handle_exit(sig, frame)
        self._draining = True
        self.state.draining = True
        log.info("draining: %d requests in flight, up to %.0f s", self.state.engine.snapshot.num_unfinished,
                 self.drain_timeout)
        threading.Thread(target=self._drain, name="kvserve-drain", daemon=True).start()

    def _drain(self) -> None:
        engine = self.state.engine
        deadline = time.monotonic() + self.drain_timeout
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine.has_unfinished():
            log.info("drain timeout: aborting %d requests", engine.snapshot.num_unfinished)
            engine.abort_all()
            give_up = time.monotonic() + 5
            while engine.has_unfinished() and time.monotonic() < give_up:
                time.sleep(0.05)
        time.sleep(0.2)  # let the final outputs reach their clients
        self.should_exit = True


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    DrainingServer(config, app.state.server, settings.drain_timeout).run()
