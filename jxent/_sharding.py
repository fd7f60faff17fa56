"""Class-axis and batch-axis collectives for code inside ``jax.shard_map``.

With ``class_axis_name`` each device holds a contiguous slice of the classes
(shard ``i`` of ``n`` holds ``[i·C_local, (i+1)·C_local)``); targets are global
class indices and class weights are sharded like the classes. Everything of
logits size stays local: only per-position values cross devices (a few
``psum``/``pmax`` of O(N) arrays).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

AxisNames = tuple[str, ...]


def as_axis_names(
    name: str | tuple[str, ...] | list[str] | None, arg: str
) -> AxisNames:
    """Normalises an axis-name option to a tuple of names (empty: unsharded)."""
    if name is None:
        return ()
    names = (name,) if isinstance(name, str) else tuple(name)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`{arg}` must be a mesh axis name or a tuple of names, got {name!r}."
        )
    for n in names:
        try:
            lax.axis_size(n)
        except NameError as e:
            raise ValueError(
                f"`{arg}`={name!r}: {n!r} is not an axis of the enclosing "
                "jax.shard_map mesh (call the loss inside shard_map over a mesh "
                "with that axis)."
            ) from e
    return names


class ClassShards(NamedTuple):
    """Static description of how the class axis is split (empty: not split)."""

    axis_names: AxisNames = ()

    @property
    def sharded(self) -> bool:
        return bool(self.axis_names)

    def count(self) -> int:
        """Number of class shards."""
        size = 1
        for name in self.axis_names:
            size *= lax.axis_size(name)
        return size

    def index(self) -> jax.Array:
        """This device's shard index (row-major over the axis names)."""
        index = jnp.zeros((), jnp.int32)
        for name in self.axis_names:
            index = index * lax.axis_size(name) + lax.axis_index(name)
        return index

    def num_classes(self, local: int) -> int:
        """Global number of classes."""
        return local * self.count() if self.sharded else local

    def localise(self, target: jax.Array, local: int) -> tuple[jax.Array, jax.Array]:
        """(index into the local slice, whether the class is on this shard)."""
        if not self.sharded:
            return target, jnp.ones(target.shape, bool)
        local_target = target - self.index() * local
        here = (local_target >= 0) & (local_target < local)
        return jnp.where(here, local_target, 0), here

    def sum(self, x):
        """Sum over class shards (a pytree of arrays)."""
        return lax.psum(x, self.axis_names) if self.sharded else x

    def max(self, x):
        """Maximum over class shards."""
        return lax.pmax(x, self.axis_names) if self.sharded else x

    def pick(self, values: jax.Array, here: jax.Array) -> jax.Array:
        """The value held by the shard that owns each position's class."""
        if not self.sharded:
            return values
        return self.sum(jnp.where(here, values, jnp.zeros_like(values)))


UNSHARDED = ClassShards()


def check_class_split(size: int, mesh, class_axes: AxisNames, what: str) -> None:
    """Raises unless the mesh axes ``class_axes`` divide ``size`` classes.

    ``what`` names the split array's class axis in the message.
    """
    count = 1
    for name in class_axes:
        count *= mesh.shape[name]
    if size % count:
        raise ValueError(
            f"{what} (size {size}) is split over mesh axes {class_axes} of "
            f"{count} devices, which do not divide it: pad the classes to a "
            "multiple and exclude the padding with `where`."
        )


def batch_sum(x, batch_axis_names: AxisNames):
    """Sum over batch shards (identity when the batch is not split)."""
    return lax.psum(x, batch_axis_names) if batch_axis_names else x


def _explicit_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def explicit_layout(logits: jax.Array, axis: int):
    """For logits sharded with Explicit mesh axes: (mesh, spec as a tuple).

    Returns None for unsharded logits and for Auto (GSPMD) or Manual axes,
    where the ordinary program is partitioned by XLA.
    """
    try:
        sharding = jax.typeof(logits).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or not getattr(mesh, "axis_names", ()):
        return None
    spec = tuple(spec) + (None,) * (logits.ndim - len(spec))
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    }
    used = {name for entry in spec for name in _explicit_axes(entry)}
    if not used or not used <= explicit:
        return None
    return mesh, spec


def axes_of(entries) -> tuple[str, ...]:
    """The mesh axis names used by a sequence of PartitionSpec entries."""
    return tuple(name for entry in entries for name in _explicit_axes(entry))
