"""`kvserve serve`: load the model, then bind the port and serve; drain in-flight requests on SIGTERM."""
from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
import time

import uvicorn

from service.api.app import create_app
from service.logs import configure_logging
from service.settings import Settings
from service.startup import StartupFailed, build_engine, ready_line
from service.stats_log import StatsLog

log = logging.getLogger("kvserve.server")


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: stop admitting (503), let running requests finish for up to
    drain_timeout seconds, abort the rest (finish_reason "abort"), then exit. A second one exits now."""

    def __init__(self, config: uvicorn.Config, state, settings: Settings):
        super().__init__(config)
        self.state, self.settings, self.drain_timeout = state, settings, settings.drain_timeout
        self._draining = False
        self._stats: StatsLog | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        engine = self.state.engine
        log.info("%s", ready_line(engine.info(), f"http://{host}:{port}", self.settings.served_model_name,
                                  engine.config.max_num_seqs))
        if self.settings.stats_interval > 0:
            self._stats = StatsLog(engine, self.settings.stats_interval).start()

    async def shutdown(self, sockets=None) -> None:
        if self._stats is not None:
            self._stats.stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.state.engine is None:
            return super().handle_exit(sig, frame)
        self._draining = True
        self.state.draining = True
        log.info("draining: %s in flight, up to %.0f s", plural(self.state.engine.snapshot.num_unfinished,
                 "request"), self.drain_timeout)
        threading.Thread(target=self._drain, name="kvserve-drain", daemon=True).start()

    def _drain(self) -> None:
        engine = self.state.engine
        deadline = time.monotonic() + self.drain_timeout
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine.has_unfinished():
            log.info("drain timeout: aborting %s", plural(engine.snapshot.num_unfinished, "request"))
            engine.abort_all()
            give_up = time.monotonic() + 5
            while engine.has_unfinished() and time.monotonic() < give_up:
                time.sleep(0.05)
        time.sleep(0.2)  # let the final outputs reach their clients
        self.should_exit = True


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def load_off_the_main_thread(settings: Settings):
    """build_engine on a thread that then ends. OpenMP keeps a team of workers for each thread that ran a
    parallel region; the main thread lives on (it runs the event loop), and its idle team took CPU from the
    engine thread's: HTTP single-stream decode ran at 0.45-0.6x (measured with the load on the main thread)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvserve-load") as pool:
        return pool.submit(build_engine, settings).result()


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    try:
        engine = load_off_the_main_thread(settings)  # before the port is bound: no half-started server
    except StartupFailed as exc:
        log.error("%s", exc)
        sys.exit(1)
    app = create_app(settings, engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=False, log_config=None)
    DrainingServer(config, app.state.server, settings).run()
