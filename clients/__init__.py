"""Python client for kvserve (and other OpenAI-compatible servers): sync and async, typed, streaming."""
from clients.client import AsyncClient, AsyncStream, Client, Stream
from clients.errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError,
                            BadRequestError, KvserveError, NotFoundError, OverloadedError, RequestTooLargeError,
                            ServerError, StreamError)

__all__ = ["AsyncClient", "AsyncStream", "Client", "Stream", "APIConnectionError", "APIStatusError",
           "APITimeoutError", "AuthenticationError", "BadRequestError", "KvserveError", "NotFoundError",
           "OverloadedError", "RequestTooLargeError", "ServerError", "StreamError"]
