"""The profiler: measure every head's role and solve a KV-memory budget into a plan (docs/profiling.md).

``probe.py`` (exact attention we can look into), ``retrieval.py``, ``mass.py``, ``razor.py``, ``duo.py``,
``patterns.py`` (one measurement each), ``solver.py`` (scores → plan), ``runner.py`` (the whole run),
``heatmap.py`` (the picture), ``cli.py`` (``headwise profile``), ``experiments.py`` (the checks in bench/results).
"""
