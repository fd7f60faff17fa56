"""Class-axis and batch-axis collectives for code inside ``jax.shard_map``.

With ``class_axis_name`` each device holds a contiguous slice of the classes
(shard ``i`` of ``n`` holds ``[i·C_local, (i+1)·C_local)``); targets are global
class indices and class weights are sharded like the classes. Everything of
logits size stays local: only per-position values cross devices (a few
``psum``/``pmax`` of O(N) arrays).
"""

from __future__ import annotations

import functools
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


def untyped_axes(names: AxisNames) -> AxisNames:
    """The axes among ``names`` over which JAX does not track what varies.

    Those are the manual axes of a ``jax.pmap`` or of a
    ``jax.shard_map(check_vma=False)``: ``lax.axis_index`` does not vary over
    them. There JAX transposes ``psum`` to ``psum``, so the derivatives of a
    loss that sums over devices count each device's copy of it. A ``vmap``
    axis is not a mesh axis and is not included, nor is an axis of size 1:
    its ``psum`` is the identity, so the derivatives are exact (code developed
    with ``pmap`` on one device differentiates).
    """
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    untyped = []
    for name in names:
        if name not in manual or lax.axis_size(name) == 1:
            continue
        kind = getattr(jax.typeof(lax.axis_index(name)), "manual_axis_type", None)
        if name not in getattr(kind, "varying", frozenset()):
            untyped.append(name)
    return tuple(untyped)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _without_derivatives(x: jax.Array, message: str) -> jax.Array:
    """``x`` itself; differentiating through it raises ``message``."""
    del message
    return x


@_without_derivatives.defjvp
def _without_derivatives_jvp(message, primals, tangents):
    del primals, tangents
    raise ValueError(message)


def refuse_untyped_derivatives(
    function: str, shards: ClassShards, batch_axes: AxisNames, *arrays
):
    """``arrays`` unchanged; their derivatives raise where an axis is untyped.

    ``None`` and non-floating arrays (integer targets) pass through as they are.

    Inside ``jax.pmap`` or ``shard_map(check_vma=False)`` the values
    are right but JAX's gradients of the sums over devices are not (8x on 8
    devices, 64x for the class-sharded ``w`` of ``linear_cross_entropy``):
    differentiating raises instead. Elsewhere nothing is added to the program.
    """
    axes = {"class_axis_name": shards.axis_names, "batch_axis_name": batch_axes}
    untyped = {arg: untyped_axes(names) for arg, names in axes.items()}
    untyped = {arg: names for arg, names in untyped.items() if names}
    if not untyped:
        return arrays
    given = ", ".join(
        f"{arg}={names[0] if len(names) == 1 else names!r}"
        for arg, names in untyped.items()
    )
    message = (
        f"{function}: derivatives with {given} inside jax.pmap or "
        "jax.shard_map(check_vma=False) are not supported. There JAX does not "
        "track which values are the same on every device and transposes psum to "
        "psum, so the gradients would come out multiplied by the number of "
        "devices (8x on 8 devices; 64x for a class-sharded `w`). Differentiate "
        "inside jax.shard_map with check_vma=True (its default), or call the loss "
        "under jax.jit on sharded arrays without axis names. Values without "
        "derivatives are right as they are."
    )
    return tuple(
        _without_derivatives(a, message)
        if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)
        else a
        for a in arrays
    )


def check_split_like_the_classes(shards: ClassShards, **arrays) -> None:
    """Raises unless each array (``None`` skipped) varies over every class axis.

    Inside ``jax.shard_map`` a class-sharded input is a different slice on
    each device of the class axes, which JAX records as the axes it varies
    over. An array replicated over a class axis, or split over another mesh
    axis into slices of the same length, would pass the shape checks and give
    a wrong loss. Axes over which JAX does not track this (``pmap``,
    ``check_vma=False``, a ``vmap`` axis) and axes of one device are not
    checked.
    """
    if not shards.sharded:
        return
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    tracked = manual - set(untyped_axes(shards.axis_names))
    axes = [n for n in shards.axis_names if n in tracked and lax.axis_size(n) > 1]
    for name, array in arrays.items():
        if array is None:
            continue
        missing = [n for n in axes if n not in varying(array)]
        if missing:
            others = sorted(varying(array) - set(shards.axis_names))
            instead = f" (it is split over {others} instead)" if others else ""
            raise ValueError(
                f"`{name}` must be split over the class axes like the classes "
                f"(class_axis_name={shards.axis_names!r}), but it is the same on "
                f"every device of mesh axis {missing[0]!r}{instead}. Pass it to "
                "jax.shard_map with the classes' PartitionSpec entry on its class "
                f"dimension, e.g. P({missing[0]!r}) for a class-weight vector."
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


def vary_like(tree, like):
    """Marks ``tree`` as varying over the shard_map axes that ``like`` varies on.

    Inside ``jax.shard_map`` the tokens vary over the batch axes; values that
    combine with them per chunk (accumulators, tangents, the loss options)
    are cast once, before the loop, so that no chunk triggers a collective and
    a scan carry keeps its type.
    """
    axes = varying(like)

    def cast(a):
        missing = tuple(sorted(axes - varying(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def varying(a) -> frozenset:
    """The shard_map axes over which ``a`` varies (empty outside shard_map)."""
    kind = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(getattr(kind, "varying", frozenset()))
