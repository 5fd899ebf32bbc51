"""Training a network on a task: the loop and its resumable state (`train`,
`checkpoints`), what a stage returns (`result`), when a stage stops or
lowers its rate (`plateau`, `stopping`), the teacher's outputs computed
once (`teacher_cache`), the held-out accuracy (`evaluation`), the paired
per-image comparisons that prune decisions rest on (`selection`), several
devices or workers (`distribution`), and the progress lines (`progress`).

It may import `common`, `settings`, `data` and `model`; never the run's
bookkeeping or the stages (the layer rules are in tests/test_imports.py).
"""
