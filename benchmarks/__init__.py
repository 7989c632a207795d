"""Measurements of gnet-jax: run each as ``python -m benchmarks.NAME`` from the repository root.

``harness`` is the one measurement harness (worker processes, interleaved
rounds, medians with ranges, machine info, tables, JSON); ``throughput`` and
``accelerator_report`` time with it; ``fidelity``, ``fidelity_seeds``,
``replay``, ``reproduction`` and ``own_data_recipes`` turn training runs into
the evidence of the docs.
"""
