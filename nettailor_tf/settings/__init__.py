"""A run's configuration: the declared options with their ranges (`options`),
each training stage's schedule (`schedules`), the whole `Config` read from
the command line or a flag file (`config`), and the settings a stage's
result depends on (`stage_settings`).

Pure Python, no TensorFlow: the command line answers --help from here before
TensorFlow loads.  It may import `common` and `data.decathlon` (the Decathlon
task names) only; the model, training, run and stages read it (the layer
rules are in tests/test_imports.py).
"""
