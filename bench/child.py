"""Entry point of one measurement: ``python -m bench.child OUT.json module:function KWARGS_JSON``.

Imports ``module``, calls ``function(**kwargs)`` and writes ``{"ok": true, "result": ...}`` to
``OUT.json``; on an exception it writes ``{"ok": false, "kind": ..., "error": ..., "traceback": ...}``
instead and exits 1. ``kind`` is ``"unavailable"`` for an ImportError (a peer that is not
installed, a pipefarm core not written yet) or a :class:`bench.core.Unavailable` (say, a missing
executable), else ``"error"``.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import sys
import traceback


def main(argv: list[str]) -> int:
    out_path, target, kwargs_json = argv
    kwargs = json.loads(kwargs_json)
    hang_after = float(os.environ.get("PFBENCH_DUMP_AFTER", "0") or 0)
    if hang_after > 0:  # before the harness kills us on timeout, show where we were stuck
        faulthandler.dump_traceback_later(hang_after, exit=False)
    try:
        mod_name, func_name = target.split(":")
        func = getattr(importlib.import_module(mod_name), func_name)
        load0 = os.getloadavg()[0]
        result = func(**kwargs)
        if isinstance(result, dict):  # how noisy the machine was, to read the numbers by
            result.setdefault("load1_before", load0)
            result.setdefault("load1_after", os.getloadavg()[0])
        payload = {"ok": True, "result": result}
        code = 0
    except BaseException as e:  # noqa: BLE001 -- report everything, KeyboardInterrupt included
        from .core import Unavailable

        kind = "unavailable" if isinstance(e, ImportError | Unavailable) else "error"
        payload = {
            "ok": False,
            "kind": kind,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        code = 1
    faulthandler.cancel_dump_traceback_later()
    with open(out_path, "w") as f:
        json.dump(payload, f, default=repr)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    # os._exit: skip interpreter teardown, where some peers' atexit hooks can hang or print noise;
    # every system was already shut down explicitly by the measured code.
    rc = main(sys.argv[1:])
    os._exit(rc)
