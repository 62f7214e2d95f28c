"""Thirtieth fault campaign: an HTTP request refused because no thread could start is not stored later.

``ThreadPoolExecutor.submit`` queues the work item, then grows the pool: when the thread cannot start
(a pids or memory limit) it raises with the item already queued. The ingest answered 503 (x-faults29) and
released the request's admission, but the queued item kept the body and ran once a thread could start: a
request the client was told to send again was stored anyway (twice, with the retry), after its 503,
outside every admission bound (each refused body held in memory until then). The HTTP workers' pool now
cancels the item it could not start a thread for before it raises.
"""

from __future__ import annotations

from pathlib import Path

from .test_faults29_thread_exhaustion import INGEST, _child


def test_a_request_refused_for_want_of_a_thread_is_never_stored(tmp_path: Path) -> None:
    """Fails on e66d960 with rows 2 (the refused span stored once the second request started a thread),
    its item queued after the 503 neither cancelled nor empty."""
    db = tmp_path / "ingest.db"
    found = _child('''
        with provider.get_tracer("faults30").start_as_current_span("sent after threads are back"):
            pass
        second = encode_spans(memory.get_finished_spans()[1:]).SerializeToString()


        def holds_bytes(value):
            if isinstance(value, (bytes, bytearray, memoryview)):
                return True
            return isinstance(value, (list, tuple)) and any(holds_bytes(part) for part in value)


        server = IngestServer(f"sqlite:///{sys.argv[1]}", host="127.0.0.1", port=0, grpc_port="off").start()
        try:
            exhaust()
            refused = post(server.port, body)[0]
            # what the pool keeps queued for the refused request (CallPool's [future, fn, args, kwargs])
            queue = server._executor._queue
            items = [queue.get_nowait() for _ in range(queue.qsize())]
            queued = [[item[0].cancelled(), holds_bytes(item[1:])] for item in items if item is not None]
            for item in items:
                queue.put(item)
            restore()
            stored = post(server.port, second)[0]
        finally:
            restore()
            server.stop()
        with sqlite3.connect(sys.argv[1]) as conn:
            rows = conn.execute("select count(*) from execution_events").fetchone()[0]
        print(json.dumps({"refused": refused, "queued": queued, "stored": stored, "rows": rows}))
    ''', str(db), prelude=INGEST)
    assert found["refused"] == 503 and found["stored"] == 200, found
    assert found["rows"] == 1, found  # the second request's span only
    assert found["queued"] == [[True, False]], found  # (cancelled, holds a body): never run, holds nothing
