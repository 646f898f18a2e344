"""Tensor and data parallelism: the mesh, and the one table that maps logical axes to mesh axes.

Parameters carry logical axis names (`modeling.param`); the KV cache and per-slot decode state have fixed
layouts. Jitted steps take arrays placed with these shardings and XLA inserts the collectives: with tp devices,
attention is split by heads (q/k/v column-parallel, o row-parallel -> one all-reduce), the MLP by its hidden
dimension (gate/up column, down row -> one all-reduce), the embedding and lm_head by vocabulary. dp replicas
hold full weights and split the cache slots (different requests).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvlm.model_config import LlavaConfig

TP, DP = "model", "data"

# Logical axis -> mesh axis. The vision tower (~0.3B parameters) stays replicated: splitting it would add two
# all-reduces per layer to a compute-bound stage that runs once per image.
RULES: dict[str, str | None] = {
    "vocab": TP,
    "embed": None,
    "embed_out": None,
    "q_heads": TP,
    "kv_heads": TP,
    "head_dim": None,
    "mlp": TP,
    "vision_embed": None,
    "vision_heads": None,
    "vision_mlp": None,
}


def make_mesh(tp: int, dp: int, cfg: LlavaConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tp * dp > len(devices):
        raise ValueError(f"tp={tp} x dp={dp} needs {tp * dp} devices, but only {len(devices)} are available "
                         f"({devices[0].platform})")
    t = cfg.text
    if t.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide the model's {t.num_heads} attention heads")
    if t.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide the MLP size {t.intermediate_size}")
    return Mesh(np.asarray(devices[: tp * dp]).reshape(dp, tp), (DP, TP))


def kv_shards(mesh: Mesh, num_kv_heads: int) -> int:
    """How many devices split the KV cache of one sequence (KV heads are replicated when tp exceeds them)."""
    tp = mesh.shape[TP]
    return tp if num_kv_heads % tp == 0 else 1


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of a parameter; an axis that its mesh axis does not divide is replicated instead."""
    out = []
    for name, size in zip(axes, shape):
        mesh_axis = RULES.get(name) if name else None
        out.append(mesh_axis if mesh_axis and size % mesh.shape[mesh_axis] == 0 else None)
    return P(*out)


def placer(mesh: Mesh):
    """`place(path, axes, host_array)` for `params.load_model`: each device receives only its shard."""

    def place(path, axes, array: np.ndarray) -> jax.Array:
        sharding = NamedSharding(mesh, spec_for(axes, array.shape, mesh))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def cache_spec(mesh: Mesh, num_kv_heads: int, ndim: int = 4) -> P:
    """KV cache [slots, kv_heads, len, head_dim] (an int8 cache's scales: [slots, kv_heads, len]): slots over
    dp, heads over tp."""
    return P(DP, TP if kv_shards(mesh, num_kv_heads) > 1 else None, *[None] * (ndim - 2))


def state_shardings(mesh: Mesh, num_kv_heads: int, cache, state):
    """Shardings of the KV cache and the decode state (per-slot arrays split over dp)."""
    cache_sh = jax.tree.map(lambda a: NamedSharding(mesh, cache_spec(mesh, num_kv_heads, a.ndim)), cache)
    state_sh = jax.tree.map(lambda a: NamedSharding(mesh, P(DP, *([None] * (a.ndim - 1)))), state)
    return cache_sh, state_sh
