"""What every other part of the package leans on: the error types and their
one-line messages (`errors`), files written atomically (`atomic`) and the
filters of TensorFlow's and LiteRT's start-up noise (`quiet`).

These modules import no other module of the project (the layer rules are in
tests/test_imports.py), so any package, `exporters` included, may import them.
"""
