"""Test fixtures shipped with the package for the tests, benchmarks and examples: tiny random-weight models of the
real architectures with locally made processors (:mod:`.tiny_models`) and reference oracles (:mod:`.oracles`).

No runtime module of tlq_hf imports this subpackage (``tests/test_layout.py`` checks it).
"""
