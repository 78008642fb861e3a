"""Admission in the HTTP parser's callback: a 429 with no ASGI task.

uvicorn reads a request in the event loop's I/O phase and starts its ASGI task, which
runs later in the same pass, after every other ready task: at saturation the streams'.
A refusal decided there waits for all of it. This protocol asks the hot path's
admission as soon as the request line and headers are parsed, and either answers the
429 right there (the rest of the body is read and dropped, the connection stays open)
or starts the task with its slot already taken, so a burst of new requests cannot all
slip past one stale count. Past `server.max_refusals_s` 429s a second, a refused
connection is not read again until its Retry-After-Ms has passed: clients that re-send
at once then wait as the SDK's do, instead of spending the core on refusals. Everything
else is uvicorn's own HTTP/1.1 protocol.

While the gateway is full, a request that arrives whole in one read (a plain keep-alive
POST to a hot path, its body complete, nothing after it) is refused before uvicorn's
parser sees it: a hand-read head (serving/api/head.py) instead of uvicorn's callbacks,
scope and cycle (0.84x the CPU per 429, benchmarks/RESULTS.md). Anything else goes to
uvicorn as before.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from serving.api.head import parse_head
from serving.api.hotpath import ADMITTED, ROUTES
from serving.api.protocol import Kind

_RAW_ROUTES = {path.encode(): kind for path, kind in ROUTES.items()}


def whole_request(data: bytes) -> Kind | None:
    """The hot path `data` asks for, if it is exactly one whole plain request to one: a
    keep-alive HTTP/1.1 POST, its body complete, nothing after it. Else None."""
    try:
        head = parse_head(data)
    except ValueError:
        return None  # uvicorn answers what it makes of it
    if (
        head is None
        or head.method != b"POST"
        or head.close
        or head.chunked
        or head.expect
        or head.version != b"HTTP/1.1"
        or head.size + head.content_length != len(data)
    ):
        return None
    return _RAW_ROUTES.get(head.path)


class AdmittingProtocol(HttpToolsProtocol):
    between = True  # the parser is between two requests (nothing of the next one fed)
    refuses_whole = True  # whole requests may be refused before uvicorn's parser

    def admitted_elsewhere(self) -> bool:
        """This request's slot was counted before it got here (serving/front)."""
        return False

    def on_message_begin(self) -> None:
        self.between = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.between = True
        super().on_message_complete()

    def _hot(self) -> Any:
        """The hot path (serving/api/hotpath.HotPath), once the app has started."""
        return getattr(getattr(self.app, "state", None), "hot", None)

    def data_received(self, data: bytes) -> None:
        hot = self._hot()
        if (
            self.refuses_whole
            and hot is not None
            and self.between
            and (why := hot.full()) is not None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
            and not self.flow.write_paused
            and not self.root_path
            and self._refuse_whole(hot, why, data)
        ):
            return
        super().data_received(data)

    def _refuse_whole(self, hot: Any, why: str, data: bytes) -> bool:
        """Refuse `data` unparsed by uvicorn if it is one whole plain hot-path request."""
        kind = whole_request(data)
        if kind is None:
            return False
        self._unset_keepalive_if_required()
        refusal = hot.refuse(why, kind)
        self._write_refusal(*hot.wire_of[id(refusal)], keep_alive=True)
        self.server_state.total_requests += 1
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._pace(hot)
        return True

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        kind = ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
        hot = self._hot()
        elsewhere = self.admitted_elsewhere()
        if kind is None or hot is None:
            super()._start_asgi_task(cycle, app)
            return
        if self.flow.write_paused:  # a 429 cannot be written from here: the task decides
            if elsewhere:  # the front counted it: admitted, and counted here as well
                hot.take()
                scope[ADMITTED] = True
            super()._start_asgi_task(cycle, app)
            return
        # What the front counted is counted here as well (the gateway's own count stays
        # whole), and may still be refused for loop lag, which only this process sees.
        refusal = hot.admit(kind, counted=elsewhere)
        if refusal is None:
            scope[ADMITTED] = True  # the hot path releases the slot it was given here
            super()._start_asgi_task(cycle, app)
            return
        self._refuse(cycle, *hot.wire_of[id(refusal)])
        if not elsewhere:  # a handed connection's reads are the front's to pace
            self._pace(hot)

    def _refuse(self, cycle: RequestResponseCycle, head: bytes, body: bytes) -> None:
        """The prebuilt 429 in one write, and the cycle ended as uvicorn's `send` ends it
        (keep-alive or close, then the next request). Its two ASGI sends, which check
        every header and frame the body, cost twice this (benchmarks/RESULTS.md)."""
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        self._write_refusal(head, body, keep_alive=cycle.keep_alive)
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def _write_refusal(self, head: bytes, body: bytes, keep_alive: bool) -> None:
        """uvicorn's Date (and server) header and, when closing, `connection: close`, added
        as its `send` adds them."""
        date = b"".join(k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers)
        close = b"" if keep_alive else b"connection: close\r\n"
        self.transport.write(head + date + close + b"\r\n" + body)

    def _pace(self, hot: Any) -> None:
        if self.transport.is_closing():
            return
        wait = hot.pace_for(self.loop.time())
        if wait is not None:
            # A refusal storm: the next request on this connection waits, unread, for
            # the Retry-After-Ms it was just given (what is already read goes on).
            self.flow.pause_reading()
            self.loop.call_later(wait, self._unpace)

    def _unpace(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()
