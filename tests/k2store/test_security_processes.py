"""A secured local cluster of real processes: `k2 cluster up --secure`, the acceptance check.

A client without credentials, with a wrong tenant, and with a stolen but non-node certificate on
an internal RPC is refused; the legitimate workload (a tenant's writes, the operator's CLI and
`k2 cluster status`) is unaffected. Marked slow: it starts node processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from k2store import launcher
from k2store.certs import channel_credentials
from k2store.client import Client, RetryPolicy
from k2store.cluster import ClusterConfig
from k2store.errors import PermissionDenied, Unauthenticated
from k2store.proto import k2_pb2 as pb
from k2store.security import bearer_metadata
from tests.secure_env import secured_cluster_up, token

pytestmark = pytest.mark.slow

RETRY = RetryPolicy()  # refusals are not retryable; a stale timestamp batch on a loaded machine is


def k2(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2store", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    with secured_cluster_up(
        tmp_path_factory.mktemp("secure"), "--tenant", "acme", "--no-wan"
    ) as cfg:
        yield cfg


def test_secured_cluster_refuses_and_serves(cluster: ClusterConfig) -> None:
    assert cluster.settings.security.tls
    with Client(cluster, token=token(cluster, "acme"), retry=RETRY) as acme:
        acme.put("eu-west/t/acme/doc", b"mine")
        for n in cluster.nodes:
            assert acme.get("eu-west/t/acme/doc", via=n.name) == b"mine"
        with pytest.raises(PermissionDenied):
            acme.get("eu-west/doc")
    with Client(cluster, token="not-a-token", retry=RETRY) as anon, pytest.raises(Unauthenticated):
        anon.get("eu-west/t/acme/doc")
    # A stolen client certificate with the operator's token, on an internal RPC: refused.
    creds = channel_credentials(cluster.settings.security, None)
    address = cluster.node("eu-west-1").address
    with grpc.secure_channel(address, creds) as ch:
        stub: Any = ch.unary_unary(
            "/k2.v1.Replication/Pull",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.PullResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            stub(pb.PullRequest(), timeout=5, metadata=bearer_metadata(token(cluster, "operator")))
        assert isinstance(e.value, grpc.Call)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The operator's tools work with one flag's worth of setup: status and the kv CLI.
    assert all(s.up for s in launcher.status(cluster))
    assert cluster.path is not None
    r = k2("kv", "--cluster", str(cluster.path), "get", "eu-west/t/acme/doc")
    assert r.returncode == 0, r.stderr
    assert "mine" in r.stdout
    r = k2("kv", "--cluster", str(cluster.path), "get", "eu-west/t/acme/doc", env={"K2_TOKEN": "x"})
    assert r.returncode != 0
    assert "credentials" in r.stderr
