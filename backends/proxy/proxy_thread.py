"""Run a Proxy on its own event loop in a daemon thread, for synchronous callers (tests, launchers)."""
from __future__ import annotations

import asyncio
import threading

from backends.proxy.config import ProxyConfig
from backends.proxy.proxy import Proxy
from omnisim.core import ProxyPolicy


class ProxyThread:
    def __init__(self, config: ProxyConfig, policy: ProxyPolicy, start_timeout_s: float = 10.0) -> None:
        self.proxy = Proxy(config, policy)
        self._timeout = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omnisim-proxy", daemon=True)

    @property
    def url(self) -> str:
        return self.proxy.url

    def start(self) -> "ProxyThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(self._timeout)
        return self

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the proxy's loop (its state is not thread-safe) and return the result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(self._timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)
            self._loop.close()

    def __enter__(self) -> "ProxyThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
