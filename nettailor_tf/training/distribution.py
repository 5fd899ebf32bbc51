"""The tf.distribute strategy a run trains under, and each worker's role in it."""
from __future__ import annotations

import tensorflow as tf

from nettailor_tf.settings.config import STRATEGIES


def make_strategy(name: str, num_cpu_devices: int = 1) -> tf.distribute.Strategy:
    """Builds the strategy; `num_cpu_devices` > 1 splits the CPU into logical
    devices so that the multi-replica path can be exercised without GPUs.

    Must run before TensorFlow initialises its devices (before any op).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    if num_cpu_devices > 1 and name not in ("mirrored", "multi_worker"):
        raise ValueError(f"--num_cpu_devices={num_cpu_devices} splits the CPU for a "
                         f"multi-replica strategy; use --strategy=mirrored (or drop it)")
    if num_cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, str]:
    """(is this process the chief, its name) under a multi-worker strategy;
    (True, 'chief') for every single-process strategy.

    Every worker runs the same steps and holds the same weights; only the
    chief's files are the run's.  The others write theirs elsewhere (the
    checkpoint calls are collective: every worker must make them)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type:
        return True, "chief"
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return is_chief, f"{task_type}{task_id}"
