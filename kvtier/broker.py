"""MQTT brokers for kvtier events: an embedded one in this process, or any broker by URL.

`EmbeddedBroker` runs amqtt's broker on this event loop, listening on a free loopback port.
`k2 cluster up` and tests use it; anything that takes a broker URL also works with a standalone
broker such as mosquitto (``mqtt://127.0.0.1:1883``).

URLs: ``mqtt://host[:port]`` or ``tcp://host[:port]`` (port 1883 by default), and
``mqtts://host[:port]`` (also ``ssl://``, ``tls://``; port 8883) for TLS. Websockets are not
supported. Credentials never go in a URL (URLs end up in logs): they are `MqttCredentials`.

Security (a cluster file with ``[security] tls = true``, k2store/security.py)
    The embedded broker started with `BrokerSecurity` listens with TLS only (the certificate
    ``broker.pem`` that `k2 certs init` issues, for localhost and 127.0.0.1) and admits a client
    only when its username is a principal's name and its password that principal's bearer token
    (checked timing-safe against every principal, kvtier/brokerauth.py); no anonymous clients.
    Publishers and subscribers connect with `MqttCredentials` (TLS against the cluster CA, the
    login). Any MQTT broker configured the same way works (the tests run mosquitto with a
    password file). Any admitted principal may publish and subscribe to every region's events:
    events carry block hashes and tenant names but no KV data, and a forged event can only
    misroute (loads verify every block), so there are no per-tenant topic ACLs yet.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from k2store.errors import InvalidArgument

if TYPE_CHECKING:
    from k2store.security import Principal, SecuritySettings

__all__ = [
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "BrokerAddress",
    "BrokerSecurity",
    "EmbeddedBroker",
    "MqttCredentials",
    "client_options",
    "parse_broker_url",
]

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
_PLAIN_SCHEMES = ("mqtt", "tcp")
_TLS_SCHEMES = ("mqtts", "ssl", "tls")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]``, ``tcp://...`` or ``mqtts://...`` -> BrokerAddress; InvalidArgument
    else (also for a URL with a user or password in it: those belong in MqttCredentials)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in _PLAIN_SCHEMES + _TLS_SCHEMES or not parts.hostname:
        raise InvalidArgument(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://...")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            "broker URL: credentials do not go in the URL (it is logged); use MqttCredentials"
        )
    tls = parts.scheme in _TLS_SCHEMES
    try:
        port = parts.port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT)
    except ValueError:
        raise InvalidArgument(f"broker URL {url!r}: bad port") from None
    return BrokerAddress(parts.hostname, port, tls)


@dataclass(frozen=True, slots=True)
class MqttCredentials:
    """What an MQTT client presents to a secured broker: TLS, verified against `ca_file` (None:
    the system's CAs), and a login. The password is never printed (`repr` leaves it out)."""

    username: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    """A client certificate, for brokers that require one (the embedded broker does not)."""

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        if self.cert_file is not None and self.key_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    @classmethod
    def for_cluster(
        cls, sec: SecuritySettings, principal: str, token: str | None = None
    ) -> MqttCredentials:
        """Log in as `principal` of a secured cluster with its token (`token`, else K2_TOKEN,
        K2_TOKEN_FILE or the settings' token file); TLS against the cluster CA."""
        from k2store.security import client_token

        tok = client_token(sec, token)
        if not tok:
            raise InvalidArgument(f"no token for MQTT principal {principal!r}")
        return cls(principal, tok, sec.ca_file)


def client_options(address: BrokerAddress, credentials: MqttCredentials | None) -> dict[str, Any]:
    """aiomqtt.Client keyword arguments for TLS and a login: TLS when the URL says so or when
    there are credentials (a password never crosses the network in clear)."""
    if credentials is not None:
        return {
            "username": credentials.username,
            "password": credentials.password,
            "tls_context": credentials.tls_context(),
        }
    if address.tls:
        return {"tls_context": ssl.create_default_context()}
    return {}


@dataclass(frozen=True, slots=True)
class BrokerSecurity:
    """What the embedded broker needs to serve TLS and check logins."""

    cert_file: Path
    key_file: Path
    principals: tuple[Principal, ...]
    """Who may log in: username = a principal's name, password = its token."""
    ca_file: Path | None = None

    @classmethod
    def for_cluster(cls, sec: SecuritySettings) -> BrokerSecurity | None:
        """The broker certificate `k2 certs init` issued and the cluster's principals, or None
        when the cluster is not secured."""
        if not sec.tls:
            return None
        from k2store.certs import BROKER

        assert sec.certs_dir is not None
        return cls(
            sec.certs_dir / f"{BROKER}.pem",
            sec.certs_dir / f"{BROKER}.key",
            sec.principals,
            sec.ca_file,
        )


class EmbeddedBroker:
    """amqtt's MQTT broker inside this process, on 127.0.0.1 (port 0: a free one).

    `start` returns once the listener is bound; `url` then names it. `stop` closes the listener
    and every client connection; clients see a broker loss and reconnect elsewhere or later.
    Use as ``async with EmbeddedBroker() as b: ... b.url ...``. Without `security` it admits
    anonymous clients over plain TCP (loopback only); with it, see the module docstring.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, security: BrokerSecurity | None = None
    ) -> None:
        self.host = host
        self.requested_port = port
        self.security = security
        self.port: int | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded broker is not running")
        return BrokerAddress(self.host, self.port, self.security is not None).url

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}
        sec = self.security
        if sec is None:
            # No $SYS publisher and no packet logging: only anonymous access on loopback.
            plugins: dict[str, Any] = {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            }
        else:
            for what, path in (("certificate", sec.cert_file), ("key", sec.key_file)):
                if not path.is_file():
                    raise InvalidArgument(
                        f"MQTT broker {what} {path} is missing (`k2 certs init` issues it)"
                    )
            listener.update(ssl=True, certfile=str(sec.cert_file), keyfile=str(sec.key_file))
            if sec.ca_file is not None:
                listener["cafile"] = str(sec.ca_file)
            plugins = {
                "kvtier.brokerauth.TokenAuthPlugin": {
                    "principals": {p.name: p.token_sha256 for p in sec.principals}
                }
            }
        return {"listeners": {"default": listener}, "plugins": plugins}

    async def start(self) -> EmbeddedBroker:
        if self._broker is not None:
            return self
        from amqtt.broker import Broker  # imported late: amqtt is heavy and only brokers need it

        config = self._config()
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
