"""Keep ``instrument()``'s own imports from tipping the application into a full garbage collection.

CPython (3.10-3.13) starts a full collection of the whole heap when the objects promoted into
its oldest generation since the last one exceed a quarter of the objects that survived it.
``instrument()`` imports SQLAlchemy, the schema, the SDK and the exporters: ~40,000 long-lived
objects. In a process that has already imported a large application (cmbagent: ~580,000
objects) before calling ``instrument()``, those objects count toward the application's next
full collection and can pull one (0.3-0.5 s of CPU in cmbagent) into a run that would have had
none: a real cmbagent ``one_shot`` run instrumented after ``import cmbagent`` had one full
collection more than the plain run and took 1.37x its wall time.

:func:`imports_settled` pauses automatic collection for the block and then moves what the
young generations hold into the oldest one directly (``gc.freeze()`` then ``gc.unfreeze()``:
two list splices), where only a full collection looks at it and it is not counted as promoted;
a young collection first frees the cyclic garbage the imports left (~15,000 objects).
The application's own young objects of that moment (at most a few thousand) move too, so its
next full collection can only come later, never earlier (a garbage cycle among them waits for
it). CPython 3.12 starts with a few hundred of its immortal static tuples in the permanent
generation; they return to the oldest generation, where a collection finds them reachable as
always. Skipped when the application disabled the collector or froze objects itself (more than
that startup handful: they must stay frozen), and on interpreters whose collector works
otherwise (3.14's incremental one, free-threaded builds, PyPy).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import sysconfig
from collections.abc import Iterator

_GENERATIONAL = (sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] < (3, 14)
                 and not sysconfig.get_config_var("Py_GIL_DISABLED"))
# CPython 3.12.1 starts with 375 objects frozen (immortal static tuples); an application that froze
# its own heap (the pre-fork pattern) has tens of thousands
_STARTUP_FROZEN = 1_000


@contextlib.contextmanager
def imports_settled(heap_imported: bool = True) -> Iterator[None]:
    """Run the block with automatic collection paused; afterwards its surviving objects sit in
    the oldest generation without counting toward the next full collection (see the module).

    ``heap_imported``: whether the application's large imports already happened. When they
    have not (``instrument()`` as the program's first line, importing AG2 itself), the block
    runs as is: the full collections during those imports are what tells the collector how
    large the long-lived heap is, and without them (the heap's size still the interpreter's at
    startup) the next full collection would come at the first chance, inside the run.
    """
    if not (heap_imported and _GENERATIONAL and gc.isenabled()) or (frozen := gc.get_freeze_count()) > _STARTUP_FROZEN:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        try:
            if gc.get_freeze_count() == frozen:  # nobody froze objects meanwhile
                # the imports' own cyclic garbage (~15,000 objects) is freed by a young collection,
                # which promotes survivors into the middle generation only: nothing is counted
                gc.collect(0)
                gc.freeze()
                gc.unfreeze()
        finally:
            gc.enable()
