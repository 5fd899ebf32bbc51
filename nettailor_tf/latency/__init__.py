"""The latency cost model (`--complexity_cost=latency`): the table of
milliseconds per branch, its calibration and its predictions (`table`, pure
Python), and measuring such a table on this machine by exporting every
branch of the student and timing it with LiteRT (`measure`).

It may import `common`, `settings`, `model` and `exporters`; never training,
the run's bookkeeping or the stages (the layer rules are in
tests/test_imports.py).
"""
