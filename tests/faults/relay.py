"""A loopback TCP relay in front of a real server that can stop relaying: a network partition.

Between the application and its database, packets stop arriving while both ends stay up (a
partition, a paused VM, a frozen server process, a NAT entry forgotten): the kernel on the
application's side accepts what it sends, and no answer, no reset, no close ever comes. The
relay does that on demand: :meth:`freeze` holds every byte it reads (either way) until
:meth:`thaw`, which delivers them in order, as a healed network would; :meth:`freeze_on`
freezes at the first client bytes holding a marker (a statement on a given table), so a
partition can start in the middle of a transaction. New connections are accepted while
frozen (the handshake is the kernel's) and relayed once thawed. :meth:`forget` heals the
network for new connections only: those open then stay silent until the relay closes (a
NAT entry or load balancer that forgot them: the database answers again, an attempt begun
before does not). Closing the relay closes every connection both ways, so the server ends
the sessions it held.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any


class Relay:
    """Relays 127.0.0.1:<port> to ``upstream`` (host, port) until closed (a context manager)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._gone = threading.Event()  # set when closed: ends the waits of forgotten connections
        self._forgotten: set[int] = set()  # ids of the sockets forget() cut off
        #: connections accepted so far
        self.accepted = 0
        #: set when a freeze_on marker was seen (the partition has started)
        self.frozen_by_marker = threading.Event()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def freeze(self) -> None:
        """Stop relaying: bytes read from now on are held until :meth:`thaw`."""
        self._flowing.clear()

    def freeze_on(self, marker: bytes) -> None:
        """Freeze when the client sends bytes holding ``marker`` (they are held too)."""
        with self._lock:
            self._marker = marker

    def thaw(self) -> None:
        """Deliver what was held and relay again."""
        with self._lock:
            self._marker = None
        self._flowing.set()

    def forget(self) -> None:
        """Relay again, except for the connections open now: what they send or are sent is
        held until the relay closes."""
        with self._lock:
            self._marker = None
            self._forgotten.update(id(sock) for sock in self._sockets)
        self._flowing.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._gone.set()
            sockets, self._sockets = self._sockets, []
        self._flowing.set()
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    self._flowing.wait()  # a partition hides a hang-up too
                    if id(source) in self._forgotten:
                        self._gone.wait()
                    break
                if from_client:
                    with self._lock:
                        if self._marker is not None and self._marker in data:
                            self._marker = None
                            self._flowing.clear()
                            self.frozen_by_marker.set()
                self._flowing.wait()
                if id(source) in self._forgotten:
                    self._gone.wait()
                if self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        # one side is gone: so is the other (the server ends the session of a client that left)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
