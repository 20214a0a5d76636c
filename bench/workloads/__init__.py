"""One module per workload. Every module here is imported by ``python -m bench`` and registers
its workload with :func:`bench.core.workload`; adding a workload is adding a module.

A workload is ``run(ctx) -> list[Row]``. Its measurements are ``module:function`` targets run by
``ctx.measure([...Job...])``, each in a fresh child process (see :mod:`bench.core`); a child
function takes JSON-able keyword arguments and returns a JSON-able dict.
"""
