"""The embedded MQTT broker's login check: a principal's name and its bearer token.

Loaded by amqtt by its dotted path when `kvtier.broker.EmbeddedBroker` starts with security (so
importing kvtier never imports amqtt). A client is admitted when its password is the token of a
principal of the cluster file (SHA-256 compared timing-safe against every principal, no early
exit: `k2store.security.find_principal`) and its username is that principal's name. Anonymous
clients and everyone else are refused (CONNACK "not authorized"). Nothing here logs a username
or a password.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from k2store.security import Principal, find_principal

__all__ = ["TokenAuthPlugin"]


class TokenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    @dataclass
    class Config:
        principals: dict[str, str] = field(default_factory=dict)
        """Principal name -> hex SHA-256 of its token (the cluster file's `token_sha256`)."""

    def __init__(self, context: object) -> None:
        super().__init__(context)
        cfg = self.context.config
        table: dict[str, str] = getattr(cfg, "principals", {}) or {}
        self._principals = tuple(Principal(n, token_sha256=d) for n, d in sorted(table.items()))
        self._digests = [bytes.fromhex(p.token_sha256) for p in self._principals]

    async def authenticate(self, *, session: Session) -> bool:
        name, password = session.username, session.password
        if not name or not password:
            return False
        token = password.decode() if isinstance(password, bytes) else str(password)
        found = find_principal(self._principals, token, self._digests)
        return found is not None and found.name == name
