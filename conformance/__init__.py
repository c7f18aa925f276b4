"""Conformance suite: optimized inference paths of transformers models against the plain path.

The package is a pytest plugin (``conformance.plugin``), a variant registry
(``conformance.variants``), a model zoo (``conformance.zoo``) and the suite's test modules
(``conformance.suite``). Run it with ``pytest --pyargs conformance``.
"""

__version__ = "0.1.0"
