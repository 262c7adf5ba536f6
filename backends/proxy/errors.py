"""How one request's attempt ends when it does not end with an answer relayed from an engine: the exceptions the
proxy's parts raise to the HTTP handlers, which turn each into the client's answer."""
from __future__ import annotations


class Retry(Exception):
    """The upstream ``instance`` failed before the client got anything: try again elsewhere."""

    def __init__(self, message: str, instance: str = ""):
        super().__init__(message)
        self.instance = instance


class Reject(Exception):
    """The proxy answers the client itself: ``status`` (429, 503...), an error of type ``kind``."""

    def __init__(self, status: int, message: str, kind: str, retry_after: bool = False):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


class UpstreamAnswer(Exception):
    """The upstream refused the request itself (4xx): pass its answer to the client as is."""

    def __init__(self, status: int, body: bytes, content_type: str):
        self.status, self.body, self.content_type = status, body, content_type
