"""Evaluation: generated long-context tasks, scoring, fidelity to dense, the ``headwise eval`` runner and its
report. See docs/eval.md."""
