"""The server's shared state (engine, tokenizer, settings, lifecycle flags) and its FastAPI dependencies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import APIError
from service.engine.engine import Engine
from service.engine.status import EngineInfo
from service.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    engine: Engine | None = None  # running on its own thread once the app has started
    draining: bool = False

    @property
    def info(self) -> EngineInfo | None:
        """The model and engine facts, once loaded."""
        return self.engine.info() if self.engine is not None else None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.snapshot.healthy and not self.draining

    def not_ready_reason(self) -> str:
        if self.engine is None:
            return "model is loading"
        if self.draining:
            return "server is shutting down"
        return f"engine is not running: {self.engine.snapshot.dead_reason}"


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def get_engine(request: Request) -> Engine:
    """The engine, or a 503 (with Retry-After) while loading, draining or dead."""
    state = get_state(request)
    if not state.ready:
        raise APIError(503, state.not_ready_reason(), None, "unavailable")
    return state.engine


def check_model_name(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.settings.served_model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves "
                            f"{state.settings.served_model_name!r}", "model", "model_not_found")


StateDep = Annotated[ServerState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
