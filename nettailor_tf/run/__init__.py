"""A run's bookkeeping: the workdir's layout and lock (`workdir`), report.json
(`report`), the networks handed from stage to stage, built from the
configuration and the workdir's files (`artifacts`), and the figures drawn
from the results (`architecture_figure`, `deployment_plots`).

It may import `common`, `settings`, `data`, `model`, `latency` and
`exporters`; never training or the stages (the layer rules are in
tests/test_imports.py).
"""
