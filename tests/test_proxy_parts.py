"""Unit tests of the proxy's parts that need no engines (the whole proxy: tests/test_proxy.py)."""
from __future__ import annotations

from backends.proxy import ProxyConfig, Upstream
from backends.proxy.prefix_source import NoPrefixSource
from backends.proxy.request_parser import RequestParser


def test_request_ids_are_unique_among_the_requests_being_served():
    serving = {"abc", "req-0", "abc-1"}
    parser = RequestParser(ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1"),)), NoPrefixSource(), None,
                           lambda: 0.0, serving)
    body = {"prompt": "a b", "max_tokens": 1}
    assert parser.parse({"X-Request-Id": "new"}, body, "completions").id == "new"
    assert parser.parse({}, body, "completions").id == "req-1"  # req-0 is a client's own id, in flight
    assert parser.parse({"X-Request-Id": "abc"}, body, "completions").id == "abc-2"
