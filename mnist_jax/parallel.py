"""Devices: the data-parallel mesh and the shardings the trainer uses.

One mesh axis, `data`, spans every device of every process. Batches are split
along it; params and optimizer state are replicated, so XLA averages gradients
across devices inside the jitted step.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mnist_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all hosts).

    Auto axes: shardings are hints that XLA propagates (the batch constraint in
    the step), rather than part of every array's type.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    devices = mesh.shape[DATA_AXIS]
    if batch_size % devices:
        raise ConfigError(
            f"--batch-size {batch_size} does not divide evenly over {devices} devices; "
            f"use a multiple of {devices}"
        )
