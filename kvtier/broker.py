"""MQTT brokers for kvtier events: an embedded one in this process, or any broker by URL.

`EmbeddedBroker` runs amqtt's broker on this event loop, listening on a free loopback port
(anonymous clients, plain TCP). `k2 cluster up` and tests use it; anything that takes a broker
URL also works with a standalone broker such as mosquitto (``mqtt://127.0.0.1:1883``).

URLs: ``mqtt://host[:port]`` or ``tcp://host[:port]`` (port 1883 by default). TLS and
websockets are not supported here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from k2store.errors import InvalidArgument

__all__ = ["DEFAULT_MQTT_PORT", "BrokerAddress", "EmbeddedBroker", "parse_broker_url"]

DEFAULT_MQTT_PORT = 1883


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` or ``tcp://host[:port]`` -> BrokerAddress; InvalidArgument else."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise InvalidArgument(f"broker URL {url!r}: expected mqtt://host[:port]")
    try:
        port = parts.port or DEFAULT_MQTT_PORT
    except ValueError:
        raise InvalidArgument(f"broker URL {url!r}: bad port") from None
    return BrokerAddress(parts.hostname, port)


class EmbeddedBroker:
    """amqtt's MQTT broker inside this process, on 127.0.0.1 (port 0: a free one).

    `start` returns once the listener is bound; `url` then names it. `stop` closes the listener
    and every client connection; clients see a broker loss and reconnect elsewhere or later.
    Use as ``async with EmbeddedBroker() as b: ... b.url ...``.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded broker is not running")
        return BrokerAddress(self.host, self.port).url

    async def start(self) -> EmbeddedBroker:
        if self._broker is not None:
            return self
        from amqtt.broker import Broker  # imported late: amqtt is heavy and only brokers need it

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}},
            # No $SYS publisher and no packet logging: only anonymous access on loopback.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        broker = Broker(config)
        await broker.start()
        self._broker = broker
        self.port = _bound_port(broker, self.requested_port)
        return self

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        self.port = None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bound_port(broker: Any, requested: int) -> int:
    """The port the default listener bound (amqtt keeps the asyncio server per listener)."""
    server = getattr(broker, "_servers", {}).get("default")
    sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
    for sock in sockets:
        port: int = sock.getsockname()[1]
        return port
    if requested:
        return requested
    raise RuntimeError("amqtt did not report the port it bound; pass an explicit port")
