"""Entry point of one measurement: ``python -m bench.child OUT.json module:function KWARGS_JSON``.

Imports ``module``, calls ``function(**kwargs)`` and writes ``{"ok": true, "result": ...}`` to
``OUT.json``; on an exception it writes ``{"ok": false, "kind": ..., "error": ..., "traceback": ...}``
instead and exits 1. ``kind`` is ``"unavailable"`` when a module is missing (a peer that is not
installed, or a pipefarm core not written yet), else ``"error"``.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback


def main(argv: list[str]) -> int:
    out_path, target, kwargs_json = argv
    kwargs = json.loads(kwargs_json)
    try:
        mod_name, func_name = target.split(":")
        func = getattr(importlib.import_module(mod_name), func_name)
        result = func(**kwargs)
        payload = {"ok": True, "result": result}
        code = 0
    except BaseException as e:  # noqa: BLE001 -- report everything, KeyboardInterrupt included
        kind = "unavailable" if isinstance(e, ImportError) else "error"
        payload = {
            "ok": False,
            "kind": kind,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        code = 1
    with open(out_path, "w") as f:
        json.dump(payload, f, default=repr)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    # os._exit: skip interpreter teardown, where some peers' atexit hooks can hang or print noise;
    # every system was already shut down explicitly by the measured code.
    import os

    rc = main(sys.argv[1:])
    os._exit(rc)
