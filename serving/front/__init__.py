"""`server.front`: a second process owns the port and refuses at capacity in microseconds.

Why: at its peak the gateway's one event loop is saturated by design, and a new
request, refusal or not, waits for the loop's current pass over every active stream
(10-70 ms at 512 streams; benchmarks/RESULTS.md, "A front process"). The kernel wakes
a mostly idle process on the same core within a few milliseconds, so refusing there
meets a 429 in milliseconds without giving the gateway another core.

How: the front (`acceptor.py`, stdlib and uvloop only) accepts connections and reads
each request's head. A request it can refuse (a hot-path POST while the gateway holds
`server.max_in_flight` of them) gets its 429 there, from bytes the gateway built. Every
other request is handed over with its socket (SCM_RIGHTS over a SOCK_SEQPACKET pair)
and the bytes read so far; the gateway serves it with its own HTTP protocol
(`handoff.py`) and, once the response is written, gives the idle connection back, so
the next request on it is the front's again. The front's in-flight count is what it
handed and was not yet given back: exact, with no shared memory.
"""
