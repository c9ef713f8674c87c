"""A loopback TCP proxy for tests that cut connections on purpose.

    with TcpProxy("http://127.0.0.1:8333") as proxy:     # forwards 127.0.0.1:<free port> -> target
        cfg = ... s3.endpoint_url=proxy.url ...
        proxy.cut(b"ckpt-00000008/__1_", after_bytes=4096)  # uploads of that key die halfway
        ...                                               # (every retry too)
        proxy.heal()                                      # traffic flows again
        proxy.cuts                                        # connections reset so far

A client connection is cut once the bytes it has sent contain `pattern` (matched across
reads, so a request line split over two packets still matches): the proxy forwards
`after_bytes` more bytes of that stream to the server, then resets both sides (SO_LINGER 0:
an RST, as a dying load balancer or a pulled cable mid-transfer shows it to the client).
If the server starts to answer before that (the whole request got through), the answer is
withheld and the connection is reset at once: the upload may have landed, but the client
never learns it. An interim "100 Continue" still passes, or a client that waits for it
before sending its body could never be cut inside the body.

The policy holds for every connection, new or reused, until `heal()`: client retries
(botocore's, the AWS SDK's inside pyarrow) meet the same fate as the first try.

Standard library only; two threads per connection (one per direction), which never
deadlock on full buffers the way one thread writing both ways can.
"""

from __future__ import annotations

import socket
import struct
import threading
from urllib.parse import urlsplit

_CHUNK = 65536
_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class TcpProxy:
    def __init__(self, target: str | tuple[str, int]):
        if isinstance(target, str):
            parts = urlsplit(target if "://" in target else f"tcp://{target}")
            target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.target = target
        self._lock = threading.Lock()
        self._pattern: bytes | None = None
        self._after = 0
        self.cuts = 0  # connections reset by the policy
        self.connections = 0  # client connections accepted
        self.cut_requests: list[bytes] = []  # the line that matched, per cut connection
        self._listener: socket.socket | None = None
        self._conns: set["_Connection"] = set()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the proxy first"
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, pattern: bytes, after_bytes: int = 0) -> None:
        """Reset every client connection whose outgoing stream contains `pattern`, after
        forwarding `after_bytes` more bytes past the end of the match."""
        if not pattern:
            raise ValueError("cut() needs a non-empty pattern")
        with self._lock:
            self._pattern, self._after = bytes(pattern), max(0, int(after_bytes))

    def heal(self) -> None:
        """Stop cutting; connections already being cut still are."""
        with self._lock:
            self._pattern = None

    def start(self) -> "TcpProxy":
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _wake_and_close(listener)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close(reset=False)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals

    def _policy(self) -> tuple[bytes | None, int]:
        with self._lock:
            return self._pattern, self._after

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stop() closed the listener
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)  # the target is down: the client sees a refused/reset connection
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server)
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn: "_Connection", was_cut: bool) -> None:
        with self._lock:
            self._conns.discard(conn)
            if was_cut:
                self.cuts += 1
                self.cut_requests.append(conn.matched_request)


class _Connection:
    """One client connection and its server connection, pumped by two threads."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, server: socket.socket):
        self.proxy, self.client, self.server = proxy, client, server
        self._lock = threading.Lock()
        self._closed = False
        self.remaining: int | None = None  # bytes still to forward before the cut; None: not armed
        self.matched_request = b""
        self._tail = b""  # last len(pattern) - 1 bytes seen, for matches across reads
        self._recent = b""  # the last few KB sent, to record which request got cut

    def start(self) -> None:
        threading.Thread(target=self._upstream, daemon=True, name="tcpproxy-up").start()
        threading.Thread(target=self._downstream, daemon=True, name="tcpproxy-down").start()

    def _upstream(self) -> None:
        """client -> server, watching for the pattern."""
        try:
            while True:
                data = self.client.recv(_CHUNK)
                if not data:
                    _half_close(self.server)
                    return
                self._recent += data
                if self.remaining is None:
                    self._arm_if_matched(data)
                self._recent = self._recent[-8192:]
                if self.remaining is not None:
                    n = min(self.remaining, len(data))
                    if n:
                        self.server.sendall(data[:n])
                    self.remaining -= n
                    if self.remaining == 0:
                        self.close(reset=True)
                        return
                else:
                    self.server.sendall(data)
        except OSError:
            self.close(reset=False)

    def _arm_if_matched(self, data: bytes) -> None:
        pattern, after = self.proxy._policy()
        if pattern is None:
            self._tail = b""
            return
        window = self._tail + data
        at = window.find(pattern)
        self._tail = window[-(len(pattern) - 1):] if len(pattern) > 1 else b""
        if at < 0:
            return
        # Bytes of `data` up to the end of the match, then `after` more.
        end_in_data = at + len(pattern) - (len(window) - len(data))
        self.remaining = max(0, end_in_data) + after
        # For the record: the line that matched, from its HTTP method when it is a request line
        # (on a reused connection the previous request's body may run straight into it).
        pos = len(self._recent) - len(window) + at
        newline = self._recent.rfind(b"\r\n", 0, pos)
        line_start = max(newline + 2 if newline >= 0 else 0, pos - 200)
        methods = [self._recent.rfind(m, line_start, pos) for m in _METHODS]
        line_start = max([i for i in methods if i >= 0], default=line_start)
        line_end = self._recent.find(b"\r\n", pos)
        self.matched_request = self._recent[line_start:line_end if line_end >= 0 else pos + 200][:300]

    def _downstream(self) -> None:
        """server -> client; an armed connection gets no answer but a reset."""
        try:
            while True:
                data = self.server.recv(_CHUNK)
                if not data:
                    _half_close(self.client)
                    return
                if self.remaining is not None and not data.startswith(b"HTTP/1.1 100 "):
                    self.close(reset=True)
                    return
                self.client.sendall(data)
        except OSError:
            self.close(reset=False)

    def close(self, reset: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Counted before the sockets close: a client that sees the reset may look at once.
        self.proxy._forget(self, was_cut=reset)
        for s in (self.client, self.server):
            if reset:
                _reset(s)
            else:
                _wake_and_close(s)


def _half_close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _wake_and_close(s: socket.socket) -> None:
    # shutdown wakes a thread blocked in recv()/accept() on this socket; close() alone does not.
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def _reset(s: socket.socket) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on with a zero timeout."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)  # wakes the other pump thread without sending anything
    except OSError:
        pass
    s.close()
