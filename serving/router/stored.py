"""Stored Responses across replicas: the response id a client holds names the replica
that stores it. Pure.

vLLM keeps a stored response (`store: true`) in the memory of the one engine that
made it, and `previous_response_id`, `GET /v1/responses/{id}` and `.../cancel` work only
there. So the gateway hands out `resp_<tag>~<rest>` for the engine's `resp_<rest>`,
where the tag is the replica's name in lowercase base32 (a-z, 2-7: safe in a URL path,
the same on every gateway replica), and on the way in it reads the tag back, sends the
request to that replica, and gives the engine its own id. An id without a tag (another
server's, or one from before) goes to the engine as it came.

On the way out every `"...": "resp_` in the answer (the response's `id`, and an echoed
`previous_response_id`, which is from the same replica) gets the tag. A model's own
text cannot hold that sequence unescaped: JSON writes its quotes as `\\"`.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache

PREFIX = "resp_"
_SEP = "~"
_ID_VALUE = re.compile(rb'("\s*:\s*")resp_')


@lru_cache(maxsize=1024)
def tag_of(replica: str) -> str:
    return base64.b32encode(replica.encode()).decode().rstrip("=").lower()


def replica_of(tag: str) -> str | None:
    """The replica a tag names; None for anything that is not a tag."""
    if not tag or not tag.isalnum():
        return None
    padded = tag.upper() + "=" * (-len(tag) % 8)
    try:
        return base64.b32decode(padded).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def public_id(engine_id: str, replica: str) -> str:
    """The id a client holds for the engine's `engine_id` on `replica`."""
    if not engine_id.startswith(PREFIX):
        return engine_id
    return f"{PREFIX}{tag_of(replica)}{_SEP}{engine_id[len(PREFIX) :]}"


def split_id(response_id: str) -> tuple[str | None, str]:
    """(the replica, the engine's own id) for an id this gateway handed out; (None, id)
    for any other."""
    if not response_id.startswith(PREFIX) or _SEP not in response_id:
        return None, response_id
    tag, rest = response_id[len(PREFIX) :].split(_SEP, 1)
    replica = replica_of(tag)
    if replica is None or not rest:
        return None, response_id
    return replica, PREFIX + rest


def retag(body: bytes, replica: str) -> bytes:
    """An engine's answer (a JSON body or stream events) with its response ids public."""
    if b"resp_" not in body:
        return body
    return _ID_VALUE.sub(rb"\1resp_" + tag_of(replica).encode() + _SEP.encode(), body)
