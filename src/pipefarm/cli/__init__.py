"""The ``pipefarm`` command line: one module per verb group.

::

    app      the ``main`` group, its one-line errors and exit codes, ``_open`` (a verb's run)
    params   shared option values: task ids (``_ids``), timeouts
    submit   submit
    run      run, retry, cancel
    inspect  status, results, logs, failures, list, show (they only read)
    cluster  array, worker (many hosts)

The entry point ``pipefarm = "pipefarm.cli:main"`` and ``python -m pipefarm`` both use
:data:`main`; importing the verb modules here is what registers the verbs on it.
"""

from . import cache, cluster, inspect, report, run, serve, submit, watch  # noqa: F401  (registers the verbs on main)
from .app import EXIT_FAILED_TASKS, EXIT_USAGE, _die, _Main, _open, main
from .params import _ids

__all__ = ["EXIT_FAILED_TASKS", "EXIT_USAGE", "_Main", "_die", "_ids", "_open", "main"]

