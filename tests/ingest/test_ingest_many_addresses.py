"""A client with many addresses cannot keep the OTLP/HTTP receiver full.

The per-address caps (requests in flight, connections) stop one address; an attacker with
many (a /64 of IPv6, a botnet; here 64 loopback addresses) could still open uvicorn's whole
``limit_concurrency`` worth of connections and send nothing, and every other client got
uvicorn's 503 until the header deadline (30 s by default) closed them, again and again. A
connection arriving at the cap now closes the one that has waited longest for its request
headers; requests being read or answered are never closed.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from cmbagent_otel.ingest import MAX_CONNECTIONS, IngestServer

from .test_ingest_slow_clients import connect, patient, pb_body, post, stored, wait_in_flight

__all__ = ["patient"]  # the fixture


def test_idle_connections_from_many_addresses_do_not_lock_others_out(patient: tuple[IngestServer, Path]) -> None:
    srv, db = patient
    assert srv.port is not None
    per_address = 16  # the patient server's cap: 8 connections x 2 requests in flight
    addresses = [f"127.0.{1 + i // 200}.{1 + i % 200}" for i in range(MAX_CONNECTIONS // per_address)]
    with ExitStack() as stack:
        idle: list[socket.socket] = []
        for address in addresses:
            for _ in range(per_address):
                sock = connect(srv.port, address)  # connected, never sends a byte
                stack.callback(sock.close)
                idle.append(sock)
        assert len(idle) == MAX_CONNECTIONS
        body, trace_id = pb_body()
        status, _, reply = post(srv.port, body)  # before: uvicorn's 503 while the idle ones stayed
        assert status == 200, reply
        assert trace_id in stored(db)
        # the oldest idle connections made room: the server closed them (EOF), none was reset
        idle[0].settimeout(60)
        assert idle[0].recv(1) == b""
    wait_in_flight(srv.port, 0)
