"""Decompositions of gradient-similarity scores.

Per-layer: for PyTree gradients g = (g^(1), …, g^(L)) split by layer (a group of leaves),
⟨g_z, g_x⟩ = Σ_l ⟨g_z^(l), g_x^(l)⟩, so the per-layer scores sum exactly to the whole-model score.

Per-token: for a sequence model whose query loss is a sum over tokens ℓ(z) = Σ_t ℓ_t(z),
∇ℓ(z) = Σ_t ∇ℓ_t(z), so s_t = ⟨∇ℓ_t(z), g_x⟩ sums exactly over tokens to ⟨∇ℓ(z), g_x⟩ (if the loss is
a token mean, the per-token losses passed in must carry the 1/T weight so that they still sum to it).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["layer_groups", "per_layer_scores", "per_token_gradients", "per_token_scores"]


def layer_groups(tree: Any, depth: int = 1) -> dict[str, list[int]]:
    """Group the leaves of `tree` by the first `depth` keys of their path ("layer" names, in order)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    groups: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        name = "/".join(jax.tree_util.keystr((k,)).strip("[]'.") for k in path[:depth])
        groups.setdefault(name, []).append(i)
    return groups


def per_layer_scores(query_grads: Any, train_grads: Any, *, depth: int = 1) -> dict[str, jax.Array]:
    """{layer: S_l (Q, N)} with S_l = ⟨g_z^(l), g_x^(l)⟩; PyTrees with leading axes Q and N.
    Σ_l S_l equals the whole-model dot-product score."""
    q_leaves = jax.tree_util.tree_leaves(query_grads)
    t_leaves = jax.tree_util.tree_leaves(train_grads)
    if len(q_leaves) != len(t_leaves):
        raise ValueError(f"query_grads has {len(q_leaves)} leaves but train_grads has {len(t_leaves)}")
    out = {}
    for name, idx in layer_groups(jax.tree_util.tree_map(lambda a: a[0], query_grads), depth).items():
        out[name] = sum(q_leaves[i].reshape(q_leaves[i].shape[0], -1) @ t_leaves[i].reshape(t_leaves[i].shape[0], -1).T
                        for i in idx)
    return out


def per_token_gradients(token_losses_fn: Callable[[Any], jax.Array], params: Any) -> Any:
    """∇θ ℓ_t for each token t: a PyTree with a leading axis T, from token_losses_fn(params) -> (T,)."""
    return jax.jacrev(token_losses_fn)(params)


def per_token_scores(token_grads: Any, train_grads: Any) -> jax.Array:
    """s[t, j] = ⟨∇ℓ_t(z), g_{x_j}⟩ (T, N); Σ_t s[t, j] = ⟨∇ℓ(z), g_{x_j}⟩."""
    return sum(per_layer_scores(token_grads, train_grads).values())
