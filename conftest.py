# Makes the repository root importable for tests (models/, data/, methods/, core/).
import os

# One OpenMP thread per test process unless the caller sets OMP_NUM_THREADS: the tensors of the
# tests are tiny, so a second thread per op costs more than it saves on a 2-core machine, and the
# processes the tests fork or start (ranks, restarts) would otherwise each want every core. Set
# here, before any test module imports torch; the subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
