"""`server.front`: a second process owns the port and refuses at capacity in microseconds.

Why: at its peak the gateway's one event loop is saturated by design, and a new
request, refusal or not, waits for the loop's current pass over every active stream
(10-70 ms at 512 streams; benchmarks/RESULTS.md, "A front process"). The kernel wakes
a mostly idle process on the same core within a few milliseconds, so refusing there
meets a 429 in milliseconds without giving the gateway another core.

How: the front (`acceptor.py`, stdlib and uvloop only) accepts connections and reads
each request's head. A request it can refuse (a hot-path POST while the gateway holds
`server.max_in_flight` of them) gets its 429 there, from bytes the gateway built. Every
other request is handed over: a new connection's socket once (SCM_RIGHTS over a
SOCK_SEQPACKET pair) with the bytes read so far, then each later request's bytes. The
gateway serves it with uvicorn's protocol (`handoff.py`) and, once the response is
written, parks the connection (stops reading it) and says so, and the next request on
it is the front's to read. The front's in-flight count is what it handed and was not
yet answered: exact, with no shared memory. `channel.py` lists the messages.
"""
