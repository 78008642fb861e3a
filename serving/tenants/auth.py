"""Who is calling: config-file keys (the simple case) and tenant keys from the store."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from serving.errors import Unauthorized
from serving.tenants.keys import bearer
from serving.tenants.store import GatewayStore, Principal

OPERATOR_TENANT = "default"  # config-file keys and the open gateway; tenant names may not take it
OPEN = Principal(tenant=OPERATOR_TENANT, key="anonymous", tiers=None)  # no keys configured
CONFIG = Principal(tenant=OPERATOR_TENANT, key="config", tiers=None)  # a server.api_keys key

_REFUSED = "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'."


class Authenticator:
    """`server.api_keys` keep working as before (any tier, no limits); with tenancy on,
    a tenant key is looked up in the store on every request, so a revoked key is refused
    at once. With neither, the gateway is open, as before."""

    def __init__(self, config_keys: Sequence[str], store: GatewayStore | None = None) -> None:
        self.config_keys = [k.encode() for k in config_keys]
        self.store = store

    @property
    def open(self) -> bool:
        return not self.config_keys and self.store is None

    def __call__(self, authorization: str) -> Principal:
        if self.open:
            return OPEN
        token = bearer(authorization)
        if token is None:
            raise Unauthorized(_REFUSED)
        given = token.encode()
        if any(hmac.compare_digest(given, k) for k in self.config_keys):
            return CONFIG
        found = self.store.lookup(token) if self.store is not None else None
        if found is None:
            raise Unauthorized(_REFUSED)
        return found
