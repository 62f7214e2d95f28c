"""A raw HTTP/2 client for the ingest's gRPC port, frame by frame (RFC 9113): what a hostile client sends
that grpcio's own client never would (a message compressed by hand, streams opened and reset at will,
frames in any order). HPACK: literal fields without indexing, no Huffman coding; responses are read as
frames (their header blocks are decoded only as far as tests need: whether a stream ended, and how)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _integer(value: int, prefix: int, flags: int = 0) -> bytes:
    """HPACK's integer with a ``prefix``-bit prefix (RFC 7541, 5.1)."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([flags | value])
    out = bytearray([flags | top])
    value -= top
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(fields: list[tuple[str, str]]) -> bytes:
    """``fields`` as literal header fields without indexing, new names, no Huffman (RFC 7541, 6.2.2)."""
    out = bytearray()
    for name, value in fields:
        out += b"\x00" + _integer(len(name), 7) + name.encode() + _integer(len(value), 7) + value.encode()
    return bytes(out)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    """gRPC's length-prefixed message: a compressed flag, 4 bytes of length, the bytes."""
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(payload)) + payload


def export_headers(port: int, encoding: str | None = None, extra: list[tuple[str, str]] | None = None) -> bytes:
    fields = [(":method", "POST"), (":scheme", "http"), (":path", EXPORT), (":authority", f"127.0.0.1:{port}"),
              ("content-type", "application/grpc"), ("te", "trailers")]
    if encoding is not None:
        fields.append(("grpc-encoding", encoding))
    return header_block(fields + (extra or []))


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


@dataclass
class Connection:
    """One HTTP/2 connection to ``127.0.0.1:port`` (blocking socket, ``timeout`` seconds per read)."""

    port: int
    timeout: float = 60.0
    source: str = "127.0.0.1"  # the client's address (any of 127.0.0.0/8 on Linux): the server caps each one
    sock: socket.socket = field(init=False)
    _buffer: bytes = b""
    _held: list[Frame] = field(default_factory=list)  # read while waiting for a window, not yet returned
    # flow control of what this client sends (RFC 9113, 6.9): the connection's window and each stream's
    _window: int = 65535
    _initial: int = 65535
    _streams: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout,
                                             source_address=(self.source, 0))
        # the largest window the protocol allows, for the connection and each stream: the server's answers
        # are never held back by flow control this client forgot to open
        window = struct.pack(">HI", 0x4, (1 << 31) - 1)
        more = struct.pack(">I", (1 << 31) - 65536)
        self.send(PREFACE + frame(SETTINGS, 0, 0, window) + frame(WINDOW_UPDATE, 0, 0, more))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_data(self, stream: int, data: bytes, end: bool = True, size: int = 16384) -> bool:
        """``data`` on ``stream`` in DATA frames of at most ``size`` bytes (the default largest frame), as
        the server's flow-control windows let it; False when the stream or connection ended first."""
        pieces = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        for n, piece in enumerate(pieces):
            while min(self._window, self._streams.setdefault(stream, self._initial)) < len(piece):
                got = self._read()
                if got is None or got.kind == GOAWAY or (got.stream == stream and got.kind == RST_STREAM):
                    if got is not None:
                        self._held.append(got)
                    return False
                self._held.append(got)
            self._window -= len(piece)
            self._streams[stream] -= len(piece)
            self.send(frame(DATA, END_STREAM if end and n == len(pieces) - 1 else 0, stream, piece))
        return True

    def read_frame(self) -> Frame | None:
        """The next frame, or None once the server has closed the connection."""
        if self._held:
            return self._held.pop(0)
        return self._read()

    def _read(self) -> Frame | None:
        while len(self._buffer) < 9 or len(self._buffer) < 9 + int.from_bytes(self._buffer[:3], "big"):
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        length = int.from_bytes(self._buffer[:3], "big")
        head, self._buffer = self._buffer[:9 + length], self._buffer[9 + length:]
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if kind == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, head[9:]))
        elif kind == SETTINGS and not flags & ACK:
            for at in range(9, len(head) - 5, 6):
                if int.from_bytes(head[at:at + 2], "big") == 0x4:  # SETTINGS_INITIAL_WINDOW_SIZE
                    initial = int.from_bytes(head[at + 2:at + 6], "big")
                    self._streams = {n: w + initial - self._initial for n, w in self._streams.items()}
                    self._initial = initial
            self.send(frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(head[9:13], "big") & 0x7FFFFFFF
            if stream:
                self._streams[stream] = self._streams.get(stream, self._initial) + increment
            else:
                self._window += increment
        return Frame(kind, flags, stream, head[9:])

    def until_stream_ends(self, stream: int) -> list[Frame]:
        """The frames read up to and including the one ending ``stream`` (END_STREAM or RST_STREAM), or up
        to the connection's end (then the last frames read, possibly none)."""
        frames: list[Frame] = []
        while (got := self.read_frame()) is not None:
            frames.append(got)
            if got.stream == stream and (got.kind == RST_STREAM or got.flags & END_STREAM):
                break
            if got.kind == GOAWAY:
                break
        return frames

    def close(self) -> None:
        self.sock.close()


def status_of(frames: list[Frame]) -> bytes:
    """The raw bytes of the header blocks a stream got (grpc-status and grpc-message are literal there:
    grpcio's encoder indexes names but these values are plain), for a test's ``in`` checks."""
    return b"".join(f.payload for f in frames if f.kind == HEADERS)
