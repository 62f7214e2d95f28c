"""Keep ``instrument()``'s own work from changing when the application's full garbage collections come.

CPython (3.10-3.13) starts a full collection of the whole heap at an automatic collection when
two counters allow it: generation 2's count (generation-1 collections since the last full one)
exceeds its threshold (10), and the objects promoted into the oldest generation since then
("pending") are at least a quarter of the objects that survived it. ``instrument()`` imports
SQLAlchemy, the schema, the SDK and the exporters (~40,000 long-lived objects) and builds the
provider. In a process that has already imported a large application (cmbagent: ~580,000
objects) before calling ``instrument()``, those objects, promoted the ordinary way, count toward
the application's next full collection and can pull one (0.3-0.5 s of CPU in cmbagent) into a
run that would have had none: a real cmbagent ``one_shot`` run instrumented after
``import cmbagent`` had one full collection more than the plain run and took 1.37x its wall time.

:func:`imports_settled` leaves the collector's state as the application had it and puts the
block's own survivors where no count sees them:

* on entry, with automatic collection paused, a generation-1 collection promotes the
  application's young survivors of that moment (counted, as its next one would have);
* after the block, a young collection frees the block's own cyclic garbage (~15,000 objects),
  and ``gc.freeze()`` then ``gc.unfreeze()`` (two list splices) move the block's survivors
  into the oldest generation uncounted, where only a full collection looks at them;
* ``gc.freeze()`` also zeroes the generations' counts, which would postpone a full collection
  that was due by up to eleven generation-1 collections (~77,000 allocations: from just before
  a run into it), so generation 2's count is put back with generation-1 collections of the
  then empty young generations (capped just above its threshold: past it, only the pending
  objects decide).

What is left different from a process without ``instrument()``: ~700 allocations of generation
0's count, and after the next full collection its survivors include the block's objects (that
one and the next come a little later). Which full collections fall inside a run still depends
on everything the process allocated before it; see docs/reliability.md.

CPython 3.12 starts with a few hundred of its immortal static tuples in the permanent
generation; they return to the oldest generation, where a collection finds them reachable as
always. Skipped when the application disabled the collector or froze objects itself (more than
that startup handful: they must stay frozen), and on interpreters whose collector works
otherwise (3.14's incremental one, free-threaded builds, PyPy).
"""

from __future__ import annotations

import collections
import functools
import gc
import itertools
import operator
import sys
import sysconfig

from ._varblock import CExit

_GENERATIONAL = (sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] < (3, 14)
                 and not sysconfig.get_config_var("Py_GIL_DISABLED"))
# CPython 3.12.1 starts with 375 objects frozen (immortal static tuples); an application that froze
# its own heap (the pre-fork pattern) has tens of thousands
_STARTUP_FROZEN = 1_000
_CALL = operator.methodcaller("__call__")


def imports_settled(heap_imported: bool = True) -> CExit:
    """Run the block with automatic collection paused; afterwards its surviving objects sit in
    the oldest generation without counting toward the next full collection, and the
    collector's counts are the application's (see the module).

    ``heap_imported``: whether the application's large imports already happened. When they
    have not (``instrument()`` as the program's first line, importing AG2 itself), the block
    runs as is: the full collections during those imports are what tells the collector how
    large the long-lived heap is, and without them (the heap's size still the interpreter's at
    startup) the next full collection would come at the first chance, inside the run.

    Automatic collection comes back however the block is left (:class:`~cmbagent_otel._varblock.CExit`:
    ``gc.enable()`` is the exit's first call, C code; a ``contextlib`` generator here left it off
    for as long as a Ctrl-C's traceback was kept when the interrupt landed as the block was entered
    or left); the settling after it is Python, skipped by an interrupt at its entry (the block's
    objects then count as any others do).
    """
    return _Paused(heap_imported)


class _Paused(CExit):
    """:func:`imports_settled`'s block. Its exit, when the entry paused collection: ``gc.enable()``,
    then :meth:`_settle`."""

    def __init__(self, heap_imported: bool) -> None:
        super().__init__()
        self._heap_imported = heap_imported
        self._frozen = -1  # no freeze count: nothing to settle
        self._collections = 0
        paused: list[tuple[()]] = []  # one () once the entry pauses: the exit's calls' argument tuples
        self._paused = paused
        # the starmaps read the list when they run, once
        self.close = functools.partial(  # type: ignore[method-assign]
            collections.deque, itertools.chain(itertools.starmap(gc.enable, paused),
                                               itertools.starmap(self._settle, paused)), 0)

    def __enter__(self) -> _Paused:
        if not (self._heap_imported and _GENERATIONAL and gc.isenabled()) \
                or (frozen := gc.get_freeze_count()) > _STARTUP_FROZEN:
            return self
        try:
            self._paused.append(())  # before the pause: an interrupt between the two enables what was enabled
            gc.disable()
            # the application's young survivors are promoted (and counted) now, as its next
            # generation-1 collection would have, rather than moved below uncounted
            gc.collect(1)
            self._collections = gc.get_count()[2]  # generation-1 collections since the last full one
            self._frozen = frozen  # last: an entry interrupted before it is not settled (only enabled)
        except BaseException:  # Ctrl-C as a call returned: the block is not entered, its exit never runs
            self.close()
            raise
        return self

    def _settle(self) -> None:
        if gc.get_freeze_count() != self._frozen:  # somebody froze objects meanwhile
            return
        # the block's own cyclic garbage (~15,000 objects) is freed by a young collection, which
        # promotes survivors into the middle generation only: nothing is counted (an automatic
        # one, collection enabled again, does the same)
        gc.collect(0)
        # one C call for both (a Ctrl-C as freeze() returned left the application's heap frozen for good)
        collections.deque(map(_CALL, (gc.freeze, gc.unfreeze)), 0)  # every count is 0 now, the young ones empty
        for _ in range(min(self._collections, gc.get_threshold()[2] + 1)):
            gc.collect(1)
