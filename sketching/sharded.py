"""Sharded per-example gradient sketching over a `jax.sharding.Mesh` (data and FSDP parallelism).

    mesh = sharded.make_mesh()                               # all devices on one "data" axis
    rows = sharded.sharded_sketch_per_example_gradients(sketch, state, loss_fn, params, batch, mesh)
    rows.shape == (B, m); rows.sharding == NamedSharding(mesh, P("data", None))

Data parallelism. The batch's leading axis is split over the mesh axis `data_axis`
(`NamedSharding(mesh, P("data"))`); the parameters and the sketch state are replicated
(`P()`), or the parameters are FSDP-sharded over a second axis (`fsdp_shard_params`). The existing
`sketching.sketch_per_example_gradients` (vmap over examples of g_i = ∇θ ℓ(z_i, θ), then y_i = Φ g_i)
is jitted with those input shardings and the output sharding P("data", None). Because every
per-example gradient g_i depends only on example i and the (replicated) θ, GSPMD partitions the vmap
along the batch: the device that owns z_i computes g_i and Φ g_i, and only its (b, m) slice of the
output. No gradient, per-example or summed, is ever gathered onto one device; with replicated
parameters the compiled program contains no collective at all (the tests check the HLO). With
FSDP-sharded parameters XLA all-gathers each weight where it is used (the usual FSDP forward), the
per-example gradients remain batch-sharded.

A batch whose size B is not a multiple of the data-axis size d is padded to ⌈B/d⌉·d by repeating its
last example (valid inputs, so no NaN from a made-up example), and the padded rows are dropped from
the result. The result is the same as the single-device `sketch_per_example_gradients` up to float
rounding (XLA may fuse a different number of examples per device).

Multi-host: on several processes (`attribution.distributed.initialize`), `make_mesh` spans the global
devices and `shard_batch(..., process_local=True)` builds the global batch from each process's local
rows (`jax.make_array_from_process_local_data`); the per-process rows of the result are its
`addressable_shards` (`process_local_rows`). Parameters and the sketch state, identical in every
process, are placed with `put` (`jax.make_array_from_callback` when the mesh spans other processes'
devices). tests/distributed/test_multihost.py runs this on 2 processes x 2 CPU devices.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sketching.base import Sketch, SketchState
from sketching.gradients import MODES, sketch_per_example_gradients

PyTree = Any
DATA = "data"
MODEL = "model"

__all__ = [
    "DATA", "MODEL", "make_mesh", "batch_sharding", "replicated", "put", "shard_batch", "replicate", "pad_batch",
    "fsdp_spec", "fsdp_shard_params", "sharded_sketch_per_example_gradients", "sharded_apply",
    "compiled_sharded_fn", "process_local_rows",
]


def make_mesh(
    num_devices: int | None = None,
    axes: Sequence[str] = (DATA,),
    shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over the first `num_devices` of `devices` (default `jax.devices()`: every device of every
    process) with axis names `axes`.

    One axis: shape (num_devices,). Two axes, e.g. ("data", "model"): `shape` gives the sizes (their
    product must be num_devices); by default all devices go on the first axis and the rest have size 1.
    """
    axes = tuple(axes)
    if not axes or len(set(axes)) != len(axes) or not all(isinstance(a, str) for a in axes):
        raise ValueError(f"axes must be distinct axis names, got {axes!r}")
    pool = list(jax.devices() if devices is None else devices)
    n = len(pool) if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(pool):
        raise ValueError(f"num_devices must be an int in [1, {len(pool)}] (the devices available), got {num_devices!r}")
    if shape is None:
        shape = (int(n),) + (1,) * (len(axes) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes) or math.prod(shape) != n or min(shape) < 1:
        raise ValueError(f"mesh shape {shape} must have one positive size per axis {axes} with product "
                         f"num_devices={n}")
    return Mesh(np.asarray(pool[:n], dtype=object).reshape(shape), axes)


def _check_axis(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {list(mesh.axis_names)}")
    return int(mesh.shape[axis])


def batch_sharding(mesh: Mesh, axis: str = DATA) -> NamedSharding:
    """Leading (batch) axis split over `axis`, other axes whole."""
    _check_axis(mesh, axis)
    return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`jax.device_put(x, sharding)`, also when the sharding spans other processes' devices
    (multi-host): then every process must pass the same whole value `x`, and each one places its
    addressable pieces (`jax.make_array_from_callback`). PRNG key arrays are placed replicated."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = put(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf copied whole to every device of the mesh (every process passes the same tree)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: put(x, sharding), tree)


def batch_size(batch: PyTree) -> int:
    sizes = {int(np.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(batch) if np.ndim(leaf) > 0}
    if len(sizes) != 1:
        raise ValueError(f"a batch needs one leading (batch) axis shared by all leaves, got sizes {sorted(sizes)}")
    return sizes.pop()


def pad_batch(batch: PyTree, multiple: int) -> tuple[PyTree, int]:
    """(batch padded to a multiple of `multiple` rows by repeating its last example, original size)."""
    size = batch_size(batch)
    padded = -(-size // multiple) * multiple
    if padded == size:
        return batch, size

    def pad(leaf):
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        xp = jnp if isinstance(leaf, jax.Array) else np
        tail = xp.repeat(leaf[-1:], padded - size, axis=0)
        return xp.concatenate([leaf, tail], axis=0)

    return jax.tree_util.tree_map(pad, batch), size


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = DATA, *, process_local: bool = False) -> PyTree:
    """The batch as global arrays split along their leading axis over the mesh axis `axis`.

    process_local=False: `batch` is the whole (global) batch, present in this process (single host).
    process_local=True: `batch` is this process's rows only, and the global batch is their
    concatenation in process order (`jax.make_array_from_process_local_data`; multi-host).
    The batch size (global) must be a multiple of the axis size (see `pad_batch`).
    """
    d = _check_axis(mesh, axis)
    sharding = batch_sharding(mesh, axis)
    if process_local:
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    size = batch_size(batch)
    if size % d:
        raise ValueError(f"batch size {size} is not a multiple of the {axis!r} axis size {d}; pad it (pad_batch)")
    return jax.tree_util.tree_map(lambda x: put(x, sharding), batch)


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str = MODEL) -> P:
    """PartitionSpec sharding the largest dimension of `shape` divisible by `axis_size` over `axis`
    (the first such one on ties); replicated (P()) when none is or axis_size == 1."""
    if axis_size > 1:
        candidates = [(-size, i) for i, size in enumerate(shape) if size % axis_size == 0 and size >= axis_size]
        if candidates:
            dim = min(candidates)[1]
            return P(*([None] * dim + [axis]))
    return P()


def fsdp_shard_params(params: PyTree, mesh: Mesh, axis: str = MODEL) -> PyTree:
    """FSDP-style placement: each leaf split over `axis` along its largest divisible dimension
    (`fsdp_spec`), replicated over every other mesh axis; leaves with no divisible dimension are
    replicated. Each device then holds ~1/|axis| of the parameters."""
    size = _check_axis(mesh, axis)
    return jax.tree_util.tree_map(
        lambda leaf: put(leaf, NamedSharding(mesh, fsdp_spec(np.shape(leaf), size, axis))), params)


def _on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
    """Leaves already placed by a NamedSharding of `mesh` keep it; all others are replicated on it."""
    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return put(leaf, replicated(mesh))

    return jax.tree_util.tree_map(place, tree)


def _shardings_of(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: leaf.sharding, tree)


_COMPILED: dict = {}


def compiled_sharded_fn(
    sketch: Sketch, loss_fn: Callable, mesh: Mesh, state: SketchState, params: PyTree, batch: PyTree, *,
    data_axis: str = DATA, mode: str = "explicit", chunk_size: int | None = None,
) -> Callable:
    """The jitted (state, params, batch) -> (B, m) function with explicit in/out shardings (inputs
    already on the mesh, B a multiple of the data-axis size). Exposed so that tests and benchmarks can
    lower/compile it and read its HLO."""
    out = NamedSharding(mesh, P(data_axis, None))
    key = (sketch, loss_fn, mesh, data_axis, mode, chunk_size,
           jax.tree_util.tree_structure((state, params, batch)),
           tuple(leaf.sharding for leaf in jax.tree_util.tree_leaves((state, params, batch))))
    fn = _COMPILED.get(key)
    if fn is None:
        def compute(sketch_state, p, b):
            rows = sketch_per_example_gradients(sketch, sketch_state, loss_fn, p, b, mode=mode, chunk_size=chunk_size)
            return rows

        fn = jax.jit(compute, in_shardings=(_shardings_of(state), _shardings_of(params), _shardings_of(batch)),
                     out_shardings=out)
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[key] = fn
    return fn


def sharded_sketch_per_example_gradients(
    sketch: Sketch,
    state: SketchState,
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: PyTree,
    mesh: Mesh,
    *,
    data_axis: str = DATA,
    mode: str = "explicit",
    chunk_size: int | None = None,
    drop_padding: bool = True,
) -> jax.Array:
    """Φ g_i for every example i of `batch`, shape (B, m), computed data-parallel over `mesh`.

    Same arguments and result as `sketching.sketch_per_example_gradients` plus the mesh: examples are
    split over the mesh axis `data_axis` (padded to a multiple of its size, padding dropped), the
    sketch state is replicated, `params` keep their placement if they are already on this mesh
    (e.g. `fsdp_shard_params`) and are replicated otherwise. The result is a global array sharded
    P(data_axis, None): rows on the devices that computed them. When B is not a multiple of the axis
    size d, the computation runs on the padded batch (sharded) and dropping the padding rows returns
    a (B, m) array that JAX lays out replicated (a jax.Array cannot split B rows unevenly): only
    these m numbers per example move, never a gradient; `drop_padding=False` returns the padded
    (⌈B/d⌉·d, m) rows sharded instead. A `batch` already sharded on this mesh is used as is (then B
    must be a multiple of the axis size).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed values: {list(MODES)}")
    d = _check_axis(mesh, data_axis)
    leaves = jax.tree_util.tree_leaves(batch)
    if leaves and all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
                      for x in leaves):
        size = batch_size(batch)
        padded = batch
    else:
        padded, size = pad_batch(jax.tree_util.tree_map(np.asarray, batch), d)
        padded = shard_batch(padded, mesh, data_axis)
    state = _on_mesh(state, mesh)
    params = _on_mesh(params, mesh)
    fn = compiled_sharded_fn(sketch, loss_fn, mesh, state, params, padded, data_axis=data_axis, mode=mode,
                             chunk_size=chunk_size)
    out = fn(state, params, padded)
    return out if out.shape[0] == size or not drop_padding else out[:size]


def sharded_apply(sketch: Sketch, state: SketchState, trees: PyTree, mesh: Mesh, *, data_axis: str = DATA) -> jax.Array:
    """Φ x_i for a batch of PyTrees x_i (every leaf with a leading axis of B; e.g. per-example
    gradients held batch-sharded on the mesh), shape (B, m), sharded P(data_axis, None).

    Each device applies the sketch to the trees it holds (vmap of `sketch.apply` under jit with the
    batch sharded over `data_axis`, state replicated): no tree is moved between devices and the
    compiled program has no collective. Trees not yet on the mesh are padded and sharded as in
    `sharded_sketch_per_example_gradients`.
    """
    d = _check_axis(mesh, data_axis)
    leaves = jax.tree_util.tree_leaves(trees)
    if leaves and all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
                      for x in leaves):
        size, padded = batch_size(trees), trees
    else:
        padded, size = pad_batch(jax.tree_util.tree_map(np.asarray, trees), d)
        padded = shard_batch(padded, mesh, data_axis)
    state = _on_mesh(state, mesh)
    key = ("apply", sketch, mesh, data_axis, jax.tree_util.tree_structure((state, padded)),
           tuple(leaf.sharding for leaf in jax.tree_util.tree_leaves((state, padded))))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = jax.jit(lambda st, xs: jax.vmap(lambda x: sketch.apply(st, x))(xs),
                     in_shardings=(_shardings_of(state), _shardings_of(padded)),
                     out_shardings=NamedSharding(mesh, P(data_axis, None)))
        _COMPILED[key] = fn
    out = fn(state, padded)
    return out if out.shape[0] == size else out[:size]


def process_local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as NumPy (multi-host helper:
    every process gets the rows of its own examples without gathering the global array)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:  # replicas over other mesh axes
            continue
        seen.add(start)
        rows.append(np.asarray(shard.data))
    return np.concatenate(rows) if rows else np.empty((0,) + array.shape[1:], array.dtype)
