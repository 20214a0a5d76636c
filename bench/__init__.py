"""pipefarm's KPI benchmark suite.

Run it with ``python -m bench [--quick] [--only W1,W3] [--json out.json]``. See ``bench/README.md``.

Every workload runs pipefarm and its peers (concurrent.futures, joblib, Dask, Ray, ...) in the same
invocation, each measurement in a fresh subprocess, and reports ratios pipefarm / peer so that the
numbers survive a noisy machine.
"""
