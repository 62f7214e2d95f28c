"""A PostgreSQL server that stops answering mid-run (twenty-sixth fault campaign).

A network partition, a paused VM or a frozen server process: the connection stays open, what
the exporter sends is accepted by its kernel, and no answer, error or close ever comes. The
server-side ``statement_timeout`` and ``lock_timeout`` the writer sets cannot fire (the server
is not running them), libpq's keepalives are answered by a live kernel, and psycopg waits for
an answer with no limit: on main c543977 the export hung for ever, holding the
exporter's lock, so the processor's queue went to the spill store but ``force_flush()``,
``uninstrument()`` and the interpreter's exit (provider shutdown) hung for ever too.

Now a connection still in use past the export deadline (plus a grace second) is cut by the
client: the export spills its batch within the deadline, the application exits, and once the
network heals the spill store writes every span once. The relay (:mod:`.relay`) makes the
partition: real server, real driver, real sockets.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter, span_processor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url

import cmbagent_otel as c
from cmbagent_otel.dag.database import upgrade

from .conftest import dump, plan_run_spans, reference
from .relay import Relay

pytestmark = pytest.mark.postgres

HANG_S = 120  # far past every deadline here: a thread still running then hangs for ever


def _through(relay: Relay, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)


def _upstream(url: str) -> tuple[str, int]:
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def _in_thread(call: Any, relay: Relay) -> list[Any]:
    """Run ``call`` in a thread; its result, or a failure naming the hang (the relay is closed
    then, which ends the wait, so that the test's cleanup does not hang too)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        relay.close()
        thread.join(HANG_S)
        pytest.fail(f"still waiting for a server that does not answer after {HANG_S} s")
    return result


@pytest.mark.parametrize("partition", ["between-batches", "inside-a-transaction"])
def test_faults26_an_unanswering_server_costs_an_export_its_deadline_not_forever(
        pg_schema: Any, tmp_path: Path, partition: str) -> None:
    batches = [plan_run_spans(f"batch {n}") for n in range(4)]
    with pg_schema() as url, pg_schema() as ref_url, Relay(_upstream(url)) as relay:
        upgrade(url)
        exporter = DagSpanExporter(_through(relay, url), timeout=1, spill_dir=tmp_path / "spill")
        try:
            assert exporter.export(batches[0]).name == "SUCCESS"  # a pooled connection, then the partition
            if partition == "between-batches":
                relay.freeze()
            else:
                relay.freeze_on(b"dag_nodes")
            assert _in_thread(lambda: exporter.export(batches[1]), relay)[0].name == "SUCCESS"
            if partition == "inside-a-transaction":
                assert relay.frozen_by_marker.is_set()
            # a new connection meets the partition too (connect_timeout already bounded that)
            assert _in_thread(lambda: exporter.export(batches[2]), relay)[0].name == "SUCCESS"
            stats = exporter.stats()
            assert stats["spilled"] == len(batches[1]) + len(batches[2]) and stats["dropped"] == 0, stats
            relay.thaw()
            assert exporter.export(batches[3]).name == "SUCCESS"
            assert exporter.force_flush() is True
        finally:
            exporter.shutdown()
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"], stats
        # the held bytes of the cut transaction may reach the server when the network heals:
        # its batch is then written twice, which changes nothing
        assert dump(url) == reference([s for batch in batches for s in batch], ref_url)


def test_faults26_an_instrumented_app_exits_while_its_database_does_not_answer(
        pg_schema: Any, tmp_path: Path) -> None:
    """The whole path an application takes: spans through the durable processor, the server stops
    answering in the middle of the run, the application flushes and shuts its provider down (what
    its exit does): both return, nothing is dropped, and the next process writes it all."""
    record = InMemorySpanExporter()
    with pg_schema() as url, pg_schema() as ref_url, Relay(_upstream(url)) as relay:
        upgrade(url)
        through = _through(relay, url)
        exporter = DagSpanExporter(through, timeout=1, spill_dir=tmp_path / "spill")
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(record))  # every span the app ended
        provider.add_span_processor(span_processor(exporter, schedule_delay_millis=50))
        c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)

        def app() -> bool:
            with c.workflow("partitioned", mode="planning-control"), c.phase("control"):
                with c.step(1, "before", agent="engineer"):
                    pass
                assert provider.force_flush()  # step 1 is stored: the connection is pooled
                relay.freeze_on(b"dag_nodes")
                for n in range(2, 6):
                    with c.step(n, f"step {n}", agent="engineer"):
                        pass
            flushed = provider.force_flush()
            c.uninstrument()
            provider.shutdown()
            return flushed

        try:
            _in_thread(app, relay)
        finally:
            c.uninstrument()
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["spilled"] > 0, stats
        relay.thaw()
        later = DagSpanExporter(through, spill_dir=tmp_path / "spill")  # the next process
        assert later.force_flush() is True
        later.shutdown()
        assert dump(url) == reference(record.get_finished_spans(), ref_url)


def test_faults26_the_deadline_thread_ends_when_no_connection_is_watched(pg_schema: Any, tmp_path: Path) -> None:
    """The watchdog's thread runs only while a connection is armed: once the exporter's connections
    are given back, it ends (a long-running process that stopped exporting keeps no thread of ours;
    before, it waited for ever after the first PostgreSQL export)."""
    with pg_schema() as url:
        upgrade(url)
        exporter = DagSpanExporter(url, timeout=5, spill_dir=tmp_path / "spill")
        try:
            assert exporter.export(plan_run_spans("watched")).name == "SUCCESS"
            # the export's connection was armed and given back: the thread, if it has not ended yet, ends
            for thread in [t for t in threading.enumerate() if t.name == "cmbagent-otel-deadline"]:
                thread.join(30)  # a bound for the failure case only (it used to wait for ever)
                assert not thread.is_alive(), "the deadline thread outlived every watched connection"
        finally:
            exporter.shutdown()
