"""NetTailor for Keras 3 / TensorFlow: task-tailored networks over shared,
frozen universal blocks, exported for on-device multi-task inference.

Importing the package chooses TensorFlow's CPU kernels (`cpu_kernels`), which
must happen before TensorFlow itself is imported.
"""
from nettailor_tf import cpu_kernels as _cpu_kernels

_cpu_kernels.chosen_by = _cpu_kernels.prefer_onednn()
