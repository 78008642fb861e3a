"""API keys: made, shown once, stored only as a digest, checked in constant time.

A key reads `tg-<id>-<secret>`: `id` (8 hex) is public and finds the row, the 32-byte
secret never leaves the client. The store keeps SHA-256 of the whole key: keys are
random and long, so a fast digest is enough (no password stretching needed), and
`hmac.compare_digest` compares the digests, so timing says nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_KEY = re.compile(r"^tg-([0-9a-f]{8})-([A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str]:
    """(key id, the key itself). The secret is `key[12:]` (it may hold '-' itself)."""
    key_id = secrets.token_hex(4)
    return key_id, f"tg-{key_id}-{secrets.token_urlsafe(32)}"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str | None:
    """The public id of a well-formed key; None for anything else."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def matches(key: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(key), stored)


def bearer(authorization: str) -> str | None:
    """The token of `Authorization: Bearer <token>`; None for another scheme or shape."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or token != token.strip() or " " in token:
        return None
    return token


def shown(key: str) -> str:
    """What logs and listings may show of a key: its public id, never the secret."""
    kid = key_id(key)
    return f"tg-{kid}-…" if kid else "(not a tiergate key)"
