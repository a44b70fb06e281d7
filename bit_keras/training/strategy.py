"""Choosing the `tf.distribute` strategy a run trains under."""

import json
import os

import tensorflow as tf

from bit_keras.checks import arg
from bit_keras.defaults import STRATEGIES


def make_strategy(name="auto", tpu=None):
    """A `tf.distribute.Strategy` by name.

    - "auto": "tpu" when `tpu` is given, "multi_worker" when `TF_CONFIG` names a cluster of several
      tasks, "mirrored" when there are several GPUs, else "default".
    - "default": TensorFlow's default strategy (one device, no distribution).
    - "mirrored": `MirroredStrategy` over every GPU, or over every logical CPU device when there is no
      GPU (split the CPU with `tf.config.set_logical_device_configuration` first to get several).
    - "multi_worker": `MultiWorkerMirroredStrategy`, the cluster and this task read from `TF_CONFIG`.
    - "tpu": `TPUStrategy` on the TPU at `tpu` (a name or grpc:// address; "local" for a TPU VM).
    """
    check_strategy(name, tpu)
    if name == "auto":
        if tpu:
            name = "tpu"
        elif cluster_size() > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if not tpu:
        raise ValueError(f"the tpu strategy needs a TPU address ({arg('tpu', 'NAME_OR_GRPC_ADDRESS')}, or 'local')")
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def check_strategy(name, tpu=None):
    """A one-line error for a strategy name `make_strategy` does not know, or a TPU address given to another."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown {arg('strategy')} {name!r}; choose from {STRATEGIES}")
    if tpu and name not in ("auto", "tpu"):
        raise ValueError(f"a TPU address is for the tpu strategy, not {name!r}")


def cluster_size():
    """The number of tasks in the `TF_CONFIG` cluster (0 without one); a malformed TF_CONFIG is an error."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values())
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' of task lists: {raw!r}") from None


def is_multi_worker(strategy):
    """Whether `strategy` spans several workers (so collectives involve other processes)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return sum(len(tasks) for tasks in strategy.cluster_resolver.cluster_spec().as_dict().values()) > 1


def is_chief(strategy):
    """Whether this process writes the run's files: always, except on non-chief multi-worker tasks."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().jobs
    )
