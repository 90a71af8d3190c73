"""Benchmarks: parameter counts, XLA's FLOPs and memory plan, and step time per PEFT method.

``peftjax bench`` (``peftjax/cli.py``) and the scripts in ``benchmarks/`` call
:func:`run_bench`; the analytic models the measurements are set against live in
:mod:`peftjax.bench.analytic`, the method table in :mod:`peftjax.bench.methods`.
"""

from peftjax.bench.methods import ALL_METHODS, method_config, method_names
from peftjax.bench.report import charts, table, write_json
from peftjax.bench.suite import BenchSpec, run_bench

__all__ = ["ALL_METHODS", "BenchSpec", "charts", "method_config", "method_names", "run_bench", "table", "write_json"]
