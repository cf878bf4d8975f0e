"""Block events over MQTT with TLS and logins: the embedded amqtt broker secured with the
cluster's certificates and principals (and mosquitto configured alike, when it is installed).
Every refusal path, and a legitimate publisher and subscriber unaffected."""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mosquitto_env import SKIP_REASON, free_port, mosquitto_exe, running_mosquitto

from k2store import cluster as cluster_mod
from k2store.certs import BROKER, CERTS_DIR, secure_cluster
from k2store.cluster import ClusterConfig, local_cluster
from k2store.errors import InvalidArgument
from k2store.launcher import free_ports
from kvtier.broker import (
    BrokerSecurity,
    EmbeddedBroker,
    MqttCredentials,
    client_options,
    parse_broker_url,
)
from kvtier.events import BlockEvent, EventKind, EventPublisher, EventSubscriber, ReconnectPolicy
from truetime import ManualClock, SystemClock

REGIONS = ["us-east", "eu-west"]
ONCE = ReconnectPolicy(max_consecutive_failures=1, connect_timeout_s=2.0)


def secured(tmp_path: Path) -> ClusterConfig:
    cfg = local_cluster(REGIONS, free_ports(len(REGIONS)), root=tmp_path).write(
        tmp_path / "cluster.toml"
    )
    secure_cluster(cfg, now_ns=SystemClock().now_ns(), tenants=("acme", "globex"))
    return cluster_mod.load(tmp_path / "cluster.toml")


def creds(cfg: ClusterConfig, principal: str) -> MqttCredentials:
    assert cfg.path is not None
    tok = (cfg.path.parent / CERTS_DIR / "tokens" / f"{principal}.token").read_text().strip()
    return MqttCredentials.for_cluster(cfg.settings.security, principal, tok)


async def connects(url: str, options: dict[str, Any]) -> bool:
    """Whether a bare aiomqtt client gets through the broker's TLS and login."""
    addr = parse_broker_url(url)
    try:
        async with aiomqtt.Client(addr.host, addr.port, timeout=3, **options):
            return True
    except aiomqtt.MqttError:
        return False


async def secured_round_trip(
    url: str, pub_creds: MqttCredentials, sub_creds: MqttCredentials
) -> None:
    got: list[BlockEvent] = []

    async def resync(_: object) -> None:
        pass

    async with EventSubscriber(
        url, handler=got.append, resync=resync, regions=["us-east"], credentials=sub_creds
    ) as sub:
        await sub.wait_subscribed(5)
        async with EventPublisher(
            url,
            region="us-east",
            node="bs-us-east-1",
            clock=ManualClock(),
            heartbeat_s=None,
            epoch=3,
            credentials=pub_creds,
        ) as pub:
            await pub.wait_connected(5)
            for i in range(3):
                pub.publish(EventKind.STORED, [f"{i:02x}" * 4], tenant="acme")
            assert await pub.flush()
            for _ in range(500):
                if len(got) == 3:
                    break
                await asyncio.sleep(0.01)
    assert [(e.seq, e.kind, e.tenant) for e in got] == [
        (i, EventKind.STORED, "acme") for i in (1, 2, 3)
    ]


# -- URLs and credentials -----------------------------------------------------------------------


def test_tls_urls_and_no_credentials_in_urls() -> None:
    a = parse_broker_url("mqtts://localhost")
    assert (a.port, a.tls, a.url) == (8883, True, "mqtts://localhost:8883")
    assert parse_broker_url("ssl://127.0.0.1:9").tls
    assert not parse_broker_url("mqtt://127.0.0.1:9").tls
    for bad in ["mqtt://user:secret@127.0.0.1:1", "mqtts://user@h"]:
        with pytest.raises(InvalidArgument) as e:
            parse_broker_url(bad)
        assert "secret" not in str(e.value)


def test_credentials_never_print_the_password(tmp_path: Path) -> None:
    c = creds(secured(tmp_path), "acme")
    assert c.password and c.password not in repr(c) and c.password not in str(c)
    assert c.username == "acme"
    opts = client_options(parse_broker_url("mqtt://127.0.0.1:1"), c)
    assert opts["username"] == "acme" and "tls_context" in opts  # a password never in clear


# -- the embedded broker, secured ---------------------------------------------------------------


def test_secured_embedded_broker_round_trip(tmp_path: Path) -> None:
    cfg = secured(tmp_path)

    async def body() -> None:
        security = BrokerSecurity.for_cluster(cfg.settings.security)
        assert security is not None
        async with EmbeddedBroker(security=security) as broker:
            assert broker.url.startswith("mqtts://127.0.0.1:")
            await secured_round_trip(broker.url, creds(cfg, "operator"), creds(cfg, "acme"))

    asyncio.run(body())


def test_secured_embedded_broker_refuses_everyone_else(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    sec = cfg.settings.security
    acme = creds(cfg, "acme")

    async def body() -> None:
        security = BrokerSecurity.for_cluster(sec)
        assert security is not None
        async with EmbeddedBroker(security=security) as broker:
            url = broker.url
            plain = url.replace("mqtts://", "mqtt://")
            assert await connects(url, client_options(parse_broker_url(url), acme))
            # Plain TCP to the TLS listener: no connection.
            assert not await connects(plain, {})
            assert not await connects(plain, {"username": "acme", "password": acme.password})
            # TLS, but anonymous, a wrong token, or acme's token under another name.
            tls = {"tls_context": acme.tls_context()}
            assert not await connects(url, tls)
            assert not await connects(url, {**tls, "username": "acme", "password": "-"})
            assert not await connects(url, {**tls, "username": "globex", "password": acme.password})
            assert not await connects(url, {**tls, "username": "acme", "password": ""})
            # The event drivers give up cleanly with bad credentials, having sent nothing.
            pub = EventPublisher(
                url,
                region="us-east",
                node="n",
                clock=ManualClock(),
                reconnect=ONCE,
                credentials=MqttCredentials("acme", "wrong-token-x9", sec.ca_file),
            )
            await pub.start()
            pub.publish(EventKind.STORED, ["00"])
            for _ in range(500):
                if pub.failure is not None:
                    break
                await asyncio.sleep(0.01)
            assert pub.failure is not None and pub.connects == 0 and pub.sent == 0
            assert "wrong-token-x9" not in str(pub.failure)
            await pub.close()

    asyncio.run(body())


def test_a_client_that_cannot_verify_the_broker_does_not_log_in(tmp_path: Path) -> None:
    """The right login, but checked against the system's CAs: the handshake fails before the
    password is sent."""
    cfg = secured(tmp_path)
    acme = creds(cfg, "acme")

    async def body() -> None:
        security = BrokerSecurity.for_cluster(cfg.settings.security)
        assert security is not None
        async with EmbeddedBroker(security=security) as broker:
            unverified = MqttCredentials("acme", acme.password, ca_file=None)
            opts = client_options(parse_broker_url(broker.url), unverified)
            assert not await connects(broker.url, opts)

    # paho-mqtt drops the socket of a failed TLS handshake without closing it: let it be
    # collected here, where its ResourceWarning is expected, rather than in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        asyncio.run(body())
        gc.collect()


def test_broker_security_needs_the_certificate(tmp_path: Path) -> None:
    cfg = secured(tmp_path)
    security = BrokerSecurity.for_cluster(cfg.settings.security)
    assert security is not None
    (tmp_path / CERTS_DIR / f"{BROKER}.pem").unlink()

    async def body() -> None:
        with pytest.raises(InvalidArgument, match="k2 certs init"):
            await EmbeddedBroker(security=security).start()

    asyncio.run(body())
    plain = local_cluster(REGIONS, free_ports(len(REGIONS)), root=tmp_path / "plain")
    assert BrokerSecurity.for_cluster(plain.settings.security) is None


# -- mosquitto, configured the same way ---------------------------------------------------------


@pytest.fixture
def secured_mosquitto(tmp_path: Path) -> Iterator[tuple[str, ClusterConfig]]:
    exe = mosquitto_exe()
    passwd = shutil.which("mosquitto_passwd")
    if exe is None or passwd is None:
        pytest.skip(SKIP_REASON)
    cfg = secured(tmp_path)
    d = tmp_path / CERTS_DIR
    pw = tmp_path / "mosquitto.passwd"
    for i, name in enumerate(("operator", "acme")):
        tok = (d / "tokens" / f"{name}.token").read_text().strip()
        subprocess.run(
            [passwd, "-b", *(["-c"] if i == 0 else []), str(pw), name, tok],
            check=True,
            capture_output=True,
        )
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\npersistence false\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {pw}\ncafile {d / 'ca.pem'}\ncertfile {d / 'broker.pem'}\n"
        f"keyfile {d / 'broker.key'}\n"
    )
    with running_mosquitto(exe, conf, port):
        yield f"mqtts://127.0.0.1:{port}", cfg


@pytest.mark.slow
def test_secured_mosquitto_round_trip_and_refusals(
    secured_mosquitto: tuple[str, ClusterConfig],
) -> None:
    url, cfg = secured_mosquitto
    acme = creds(cfg, "acme")

    async def body() -> None:
        await secured_round_trip(url, creds(cfg, "operator"), acme)
        tls = {"tls_context": acme.tls_context()}
        assert not await connects(url.replace("mqtts://", "mqtt://"), {})
        assert not await connects(url, tls)
        assert not await connects(url, {**tls, "username": "acme", "password": "-"})

    asyncio.run(body())
