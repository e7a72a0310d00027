"""Devices and hosts: multi-host start-up, the mesh of lanes and data, and its shardings.

The mesh has two axes over every device of every process: `trials`, along
which the lanes (trials trained together) are spread, and `data`, along which
each lane's batch is split. A lane's params and optimizer state are
replicated along `data`, so XLA averages its gradients across those devices
inside the jitted step. One lane (the solo job) puts every device on `data`.

A job spanning hosts starts `jax.distributed` before any other JAX call, from
(in order) the explicit `--coordinator-address/--num-processes/--process-id`,
Vertex AI's `CLUSTER_SPEC`, or a multi-host Cloud TPU (JAX detects it itself).
This module owns those cluster variables; a single process starts nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mnist_jax.common.errors import ConfigError
from mnist_jax.training.config import Config

DATA_AXIS = "data"
TRIALS_AXIS = "trials"
# Vertex lists each replica as host:port for its own use; JAX's coordinator listens beside it.
COORDINATOR_PORT = 8476


class Cluster(NamedTuple):
    coordinator_address: str
    num_processes: int
    process_id: int


def parse_cluster_spec(text: str) -> Cluster:
    """Vertex AI's CLUSTER_SPEC: the coordinator is workerpool0's first replica; process 0 is
    workerpool0, then workerpool1's replicas in order."""
    try:
        spec = json.loads(text)
        pools = spec["cluster"]
        chief, workers = pools["workerpool0"], pools.get("workerpool1", [])
        task_type, index = spec["task"]["type"], int(spec["task"]["index"])
        host = chief[0].rsplit(":", 1)[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ConfigError(f"CLUSTER_SPEC is not a Vertex AI cluster spec: {e!r}") from None
    if task_type == "workerpool0":
        process_id = 0
    elif task_type == "workerpool1":
        process_id = 1 + index
    else:  # workerpool2/3 (parameter servers, evaluators) have no part in data-parallel training
        raise ConfigError(f"CLUSTER_SPEC task type {task_type!r} is not a training worker pool")
    return Cluster(f"{host}:{COORDINATOR_PORT}", len(chief) + len(workers), process_id)


def find_cluster(config: Config, environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster this process belongs to, from flags or CLUSTER_SPEC; None for one process."""
    env = os.environ if environ is None else environ
    if config.coordinator_address is not None:
        return Cluster(config.coordinator_address, config.num_processes, config.process_id)  # type: ignore[arg-type]
    if env.get("CLUSTER_SPEC"):
        cluster = parse_cluster_spec(env["CLUSTER_SPEC"])
        return cluster if cluster.num_processes > 1 else None
    return None


def initialize(config: Config) -> None:
    """Starts jax.distributed when the job spans hosts; must run before any other JAX call."""
    cluster = find_cluster(config)
    if cluster is not None:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host Cloud TPU slice
        jax.distributed.initialize()


def make_mesh(lanes: int = 1) -> Mesh:
    """A (trials, data) mesh over all devices (all hosts): as many devices along `trials` as divide
    both the lane count and the device count, the rest along `data`.

    Auto axes: shardings are hints that XLA propagates (the batch constraint in
    the step), rather than part of every array's type.
    """
    devices = jax.device_count()
    trials = math.gcd(lanes, devices)
    return jax.make_mesh(
        (trials, devices // trials), (TRIALS_AXIS, DATA_AXIS), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def steps_sharded(mesh: Mesh) -> NamedSharding:
    """(steps, batch, ...) arrays: each step's batch split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def lanes_sharded(mesh: Mesh) -> NamedSharding:
    """Stacked (lanes, ...) arrays: the lanes split over the `trials` axis, replicated along `data`."""
    return NamedSharding(mesh, PartitionSpec(TRIALS_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    devices = mesh.shape[DATA_AXIS]
    if batch_size % devices:
        raise ConfigError(
            f"--batch-size {batch_size} does not divide evenly over {devices} devices; use a multiple of {devices}"
        )
