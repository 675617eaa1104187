"""A lean HTTP/1.1 client for load generators on the server's own machine.

On two shared cores the generator's CPU is taken from the server it measures: aiohttp spent
~300-500 us of CPU per request in bench/soak.py (0.45 cores at 886 requests/s), and at twice
the server's peak it could not keep its schedule. This client writes each request in one
`write` on a pooled keep-alive connection and parses only the status line, Content-Length and
Connection of the answer: what wisp (hyper) sends. No TLS, no chunked bodies, no redirects.

Connections idle longer than `max_idle` (20 s) are closed rather than reused: the server closes
idle keep-alive connections itself (wisp: --http-idle-timeout-secs, 60 s), and a request written
just as it does so gets no answer (the keep-alive race every HTTP/1.1 client must avoid).
"""

import asyncio


class NoAnswer(Exception):
    """The connection failed or closed before a whole response arrived."""


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "buf", "waiter", "status", "body_len", "close_after", "closed")

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter = None
        self.status = 0
        self.body_len = None  # None: still reading the head
        self.close_after = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.waiter is not None:
            self._parse()

    def connection_lost(self, exc):
        self.closed = True
        self._fail(NoAnswer(f"connection closed before the response ({exc or 'by the server'})"))

    def _fail(self, exc):
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _parse(self):
        if self.body_len is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self._fail(NoAnswer("response head over 64 KiB"))
                    self.transport.close()
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[:end + 4]
            try:
                self.status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self._fail(NoAnswer(f"bad status line {lines[0][:80]!r}"))
                self.transport.close()
                return
            length, close = 0, False
            for line in lines[1:]:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "content-length":
                    length = int(value)
                elif key == "connection":
                    close = value.strip().lower() == "close"
                elif key == "transfer-encoding":
                    self._fail(NoAnswer("chunked responses are not supported by this client"))
                    self.transport.close()
                    return
            self.body_len, self.close_after = length, close
        if len(self.buf) >= self.body_len:
            body = bytes(self.buf[:self.body_len])
            del self.buf[:self.body_len]
            self.body_len = None
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))


class Client:
    """Requests to one host:port over pooled keep-alive connections (one request at a time each)."""

    def __init__(self, host, port, timeout, max_idle=20.0):
        self.host, self.port, self.timeout, self.max_idle = host, port, timeout, max_idle
        self.authority = f"{host}:{port}"
        self.idle = []  # (connection, idle since), most recently used last

    async def request(self, method, path, body=b"", content_type="application/json"):
        """Returns (status, body bytes). Raises NoAnswer, asyncio.TimeoutError or OSError."""
        loop = asyncio.get_running_loop()
        conn = None
        now = loop.time()
        while self.idle:
            candidate, since = self.idle.pop()
            if candidate.closed:
                continue
            if now - since > self.max_idle:
                candidate.transport.close()
                continue
            conn = candidate
            break
        if conn is None:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
        conn.waiter = loop.create_future()
        conn.transport.write(head.encode("latin-1") + b"\r\n" + body)
        waiter = conn.waiter
        timer = loop.call_later(self.timeout, _time_out, conn, waiter)
        reusable = False
        try:
            result = await waiter
            reusable = not conn.close_after and not conn.closed
            return result
        finally:
            timer.cancel()
            if reusable:
                self.idle.append((conn, loop.time()))
            elif not conn.closed:
                conn.transport.close()

    def close(self):
        for conn, _ in self.idle:
            conn.transport.close()
        self.idle.clear()


def _time_out(conn, waiter):
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())
    conn.waiter = None
    conn.transport.close()
