"""Errors the engine raises to its callers; the API maps each to one HTTP status."""


class EngineError(RuntimeError):
    """Base class of engine errors."""


class RequestRejected(ValueError):
    """The request can never be served as asked (too long, bad token ids...). `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineOverloaded(EngineError):
    """The waiting queue is full; try again later."""


class EngineDead(EngineError):
    """The step loop has stopped; no request can be served."""
