"""The proximal Bregman response function (PBRF) as an influence ground truth.

Bae et al. 2022 ("If influence functions are the answer, then what is the question?") show that for
networks not trained to convergence, influence functions approximate the PBRF rather than
leave-one-out retraining; Grosse et al. 2023 (§2.1.1, eq. 9, §5.1) validate EK-FAC by its
correlation with it. For a training example z_m and a signed weight ε the PBRF is

    θˢ(ε) = argmin_θ  (1/N) Σᵢ D_L(h(θ, xᵢ), h(θˢ, xᵢ)) + ε L(z_m, θ) + (λ/2) ‖θ − θˢ‖²
    D_L(ŷ, ŷˢ) = L(ŷ, yᵢ) − L(ŷˢ, yᵢ) − ∇_ŷ L(ŷˢ, yᵢ)ᵀ (ŷ − ŷˢ)            (Bregman divergence)

with θˢ the final weights, h(θ, x) the network outputs and L the loss as a function of outputs.
At ε = 0 the minimiser is θˢ itself; its derivative is dθˢ/dε = −(G + λI)⁻¹ ∇L(z_m, θˢ) with G the
Gauss–Newton matrix (1/N) Σ Jᵀ H_ŷ J [Grosse et al. eq. 9, 25]. So for a measurement f (e.g. a query
loss), the PBRF influence

    S(f, z_m) = −d f(θˢ(ε))/dε |_{ε=0} = ∇fᵀ (G + λI)⁻¹ ∇L(z_m)

is exactly the damped Gauss–Newton influence that EK-FAC approximates (sign: higher = more helpful,
as in `attribution.scorers`). This module estimates it the way Bae et al. do, without any matrix:
solve the PBRF for +ε and −ε (warm start at θˢ, a fixed number of optimiser steps) and take the
central difference S ≈ −(f(θˢ(ε)) − f(θˢ(−ε))) / (2ε), whose bias is O(ε²). Every query is measured
on the same solution, so one solve pair gives the influence of z_m on all queries at once.

Solving. The unknown is the displacement u = (θ − θˢ)/ε (a change of variables; the minimiser is the
same), and the objective is divided by ε²:

    F(u) = [ (1/N) Σᵢ D_L(h(θˢ + εu, xᵢ), ŷˢᵢ) + ε L(z_m, θˢ + εu) ] / ε² + (λ/2) ‖u‖²,

so u → −(G + λI)⁻¹ ∇L(z_m) as ε → 0: the optimiser's scale does not depend on ε (Adam, whose step
size ignores the gradient's magnitude, would otherwise overshoot a displacement of size ε). The
solves for several training examples and both signs run together under `jax.vmap` (`chunk_size`
examples = 2·chunk_size problems per step); with `batch_size` the Bregman term is estimated on a
mini-batch, the SAME mini-batch for every problem of a step (common random numbers, so the noise
largely cancels in the central difference). The relative residual ‖∇F(u_T)‖ / ‖∇F(0)‖ (∇F(0) =
∇L(z_m)) is returned per solve as the convergence diagnostic.

Resumability. With `store`, each training example's result is written atomically
(`artifacts.atomic_write_npz`, no pickle) as soon as its chunk finishes, in a folder whose
`fingerprint.json` (`artifacts.check_fingerprint`) holds every setting and the caller's fingerprint;
a rerun skips stored examples, and a rerun with other settings raises `PBRFStoreMismatchError`
(`artifacts.FingerprintMismatchError`, naming each differing field) instead of mixing results.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifacts as A

__all__ = ["OPTIMIZERS", "PBRFResult", "PBRFStoreMismatchError", "pbrf_objective", "pbrf_influence"]

OPTIMIZERS = ("adam", "sgd", "lbfgs")
FORMAT = "pbrf-store"
VERSION = 1

PyTree = Any
OutputsFn = Callable[[PyTree, dict], jax.Array]      # (params, batch) -> outputs (B, ...)
OutputLoss = Callable[[jax.Array, dict], jax.Array]  # (outputs, batch) -> per-example loss (B,)
Measurement = Callable[[PyTree], jax.Array]          # params -> (Q,) measurements


PBRFStoreMismatchError = A.FingerprintMismatchError
"""The store folder holds PBRF results computed with other settings or another model (a ValueError)."""


@dataclasses.dataclass(frozen=True)
class PBRFResult:
    """PBRF influence of training examples `examples` on every measurement.

    scores: (Q, M), S = −(f(θ(+ε)) − f(θ(−ε)))/(2ε) (higher = more helpful for a loss measurement).
    measurements_plus / measurements_minus: (M, Q) f at the two solutions.
    residuals: (M, 2) relative gradient norms ‖∇F(u_T)‖/‖∇L(z_m)‖ of the (+ε, −ε) solves.
    """
    examples: np.ndarray
    scores: np.ndarray
    measurements_plus: np.ndarray
    measurements_minus: np.ndarray
    residuals: np.ndarray
    epsilon: float
    damping: float


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(tree))


def _take(tree, index):
    return jax.tree_util.tree_map(lambda a: a[index], tree)


def _num_examples(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("train must be a non-empty pytree of arrays with a leading example axis")
    n = int(np.shape(leaves[0])[0])
    for leaf in leaves:
        if np.ndim(leaf) == 0 or int(np.shape(leaf)[0]) != n:
            raise ValueError("every leaf of train must share the leading example axis; got shapes "
                             f"{[np.shape(a) for a in leaves]}")
    return n


def _bregman_terms(outputs_fn: OutputsFn, output_loss: OutputLoss, params_s: PyTree, batch: dict):
    """(ŷˢ, L(ŷˢ), ∇_ŷ L(ŷˢ)) on a batch: the fixed reference of the Bregman divergence."""
    out_s = jax.lax.stop_gradient(outputs_fn(params_s, batch))
    loss_s, pullback = jax.vjp(lambda o: output_loss(o, batch), out_s)
    (grad_s,) = pullback(jnp.ones_like(loss_s))  # per-example output gradients (loss_i depends on ŷ_i only)
    return out_s, loss_s, grad_s


def _bregman_mean(outputs_fn, output_loss, params, batch, reference) -> jax.Array:
    """(1/B) Σᵢ D_L(h(θ, xᵢ), ŷˢᵢ) over the batch."""
    out_s, loss_s, grad_s = reference
    out = outputs_fn(params, batch)
    linear = jnp.sum((grad_s * (out - out_s)).reshape(out.shape[0], -1), axis=1)
    return jnp.mean(output_loss(out, batch) - loss_s - linear)


def pbrf_objective(outputs_fn: OutputsFn, output_loss: OutputLoss, params_s: PyTree, train: dict,
                   example: dict, params: PyTree, *, epsilon: float, damping: float) -> jax.Array:
    """The PBRF objective of the module docstring at θ = `params` (full batch, no rescaling):
    (1/N) Σᵢ D_L(h(θ, xᵢ), h(θˢ, xᵢ)) + ε L(z_m, θ) + (λ/2)‖θ − θˢ‖², with `example` = z_m as a batch of one."""
    reference = _bregman_terms(outputs_fn, output_loss, params_s, train)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, params, params_s)
    return (_bregman_mean(outputs_fn, output_loss, params, train, reference)
            + epsilon * jnp.sum(output_loss(outputs_fn(params, example), example)) + 0.5 * damping * _sq_norm(diff))


def _make_optimizer(name: str, learning_rate: float | None, num_steps: int, momentum: float):
    if name == "adam":
        return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    if name == "sgd":
        return optax.sgd(optax.cosine_decay_schedule(learning_rate, num_steps), momentum=momentum or None)
    return optax.lbfgs(learning_rate)


def _settings(epsilon, damping, num_steps, optimizer, learning_rate, momentum, batch_size, seed, num_train,
              num_queries, fingerprint) -> dict:
    settings = dict(epsilon=float(epsilon), damping=float(damping), num_steps=int(num_steps), optimizer=optimizer,
                    learning_rate=None if learning_rate is None else float(learning_rate),
                    momentum=float(momentum), batch_size=batch_size, seed=int(seed), num_train=int(num_train),
                    num_queries=int(num_queries), fingerprint=fingerprint)
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ValueError(f"fingerprint must be JSON-serialisable (str, int, float, bool, None, lists, dicts): {error}")


def _open_store(store: str, settings: dict) -> None:
    """Creates the store's fingerprint or checks it (FingerprintMismatchError naming every differing field)."""
    os.makedirs(store, exist_ok=True)
    A.check_fingerprint(store, {"format": FORMAT, "version": VERSION, **settings}, what="PBRF store")


def _example_file(store: str, index: int) -> str:
    return os.path.join(store, f"example_{index:07d}.npz")


def _save_example(store: str, index: int, arrays: Mapping[str, np.ndarray]) -> None:
    A.atomic_write_npz(_example_file(store, index), {k: np.asarray(v) for k, v in arrays.items()})


def _load_example(store: str, index: int, num_queries: int) -> dict | None:
    file = _example_file(store, index)
    if not os.path.exists(file):
        return None
    with np.load(file, allow_pickle=False) as data:
        out = {k: np.asarray(data[k]) for k in data.files}
    if out.get("scores", np.zeros(0)).shape != (num_queries,):
        raise ValueError(f"{file} holds scores of shape {out.get('scores', np.zeros(0)).shape}, "
                                     f"expected ({num_queries},)")
    return out


def pbrf_influence(
    outputs_fn: OutputsFn,
    output_loss: OutputLoss,
    params: PyTree,
    train: dict,
    measurement: Measurement,
    examples: Sequence[int] | np.ndarray | None = None,
    *,
    damping: float,
    epsilon: float | None = None,
    num_steps: int = 300,
    optimizer: str = "adam",
    learning_rate: float | None = 1e-2,
    momentum: float = 0.9,
    batch_size: int | None = None,
    chunk_size: int = 8,
    seed: int = 0,
    store: str | None = None,
    fingerprint: Any = None,
    quiet: bool = True,
) -> PBRFResult:
    """PBRF influence (module docstring) of the training examples `examples` (default: all) on every
    measurement f(θ) = `measurement(params)` (shape (Q,)).

    outputs_fn(params, batch) -> network outputs h (B, ...), e.g. logits; output_loss(outputs, batch) ->
    per-example loss (B,) (e.g. summed token cross-entropy), so L(z, θ) = output_loss(outputs_fn(θ, z), z).
    params: θˢ. train: dict of arrays with a leading example axis (N). damping: λ > 0 (required: it
    makes the PBRF well posed). epsilon: ε > 0 (default 1/N, one copy of z_m); ±ε are both solved.
    optimizer: 'adam' or 'sgd' (heavy-ball `momentum`; both with cosine-decayed `learning_rate`, optional
    mini-batches of `batch_size`) or 'lbfgs' (full batch only; `learning_rate` None = zoom line search).
    chunk_size: training examples solved together under vmap. store: a folder for resumable per-example
    results (see module docstring); fingerprint: JSON data identifying the model and data (e.g.
    `attribution.index.params_hash(params)`), stored in the manifest and compared on resume.
    """
    num_train = _num_examples(train)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; allowed values: {list(OPTIMIZERS)}")
    if not (isinstance(damping, (int, float)) and damping > 0):
        raise ValueError(f"damping must be a number > 0 (the proximity term keeps the PBRF well posed), got {damping!r}")
    epsilon = 1.0 / num_train if epsilon is None else epsilon
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"epsilon must be a number > 0 (both signs are solved), got {epsilon!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or not 1 <= batch_size <= num_train):
        raise ValueError(f"batch_size must be None or an int in [1, {num_train}], got {batch_size!r}")
    if optimizer == "lbfgs" and batch_size is not None and batch_size < num_train:
        raise ValueError("optimizer='lbfgs' needs the full batch (batch_size=None): its line search compares "
                         "objective values")
    if optimizer in ("adam", "sgd") and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0 for optimizer={optimizer!r}, got {learning_rate!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    examples = np.arange(num_train) if examples is None else np.asarray(examples, np.int64).reshape(-1)
    if examples.size == 0 or examples.min() < 0 or examples.max() >= num_train:
        raise ValueError(f"examples must be non-empty indices in [0, {num_train}), got {examples.tolist()[:10]}...")
    if len(np.unique(examples)) != len(examples):
        raise ValueError("examples must not repeat an index")

    train = jax.tree_util.tree_map(jnp.asarray, train)
    f_s = np.asarray(measurement(params))
    if f_s.ndim != 1:
        raise ValueError(f"measurement(params) must return shape (Q,), got {f_s.shape}")
    num_queries = f_s.shape[0]

    settings = _settings(epsilon, damping, num_steps, optimizer, learning_rate, momentum, batch_size, seed, num_train,
                         num_queries, fingerprint)
    if store is not None:
        _open_store(store, settings)

    opt = _make_optimizer(optimizer, learning_rate, num_steps, momentum)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    full_reference = _bregman_terms(outputs_fn, output_loss, params, train) if batch_size is None else None

    def scaled_objective(u, eps, example, batch, reference):
        theta = jax.tree_util.tree_map(lambda p, d: p + eps * d, params, u)
        value = (_bregman_mean(outputs_fn, output_loss, theta, batch, reference)
                 + eps * jnp.sum(output_loss(outputs_fn(theta, example), example)))
        return value / eps ** 2 + 0.5 * damping * _sq_norm(u)

    def batch_at(step):
        if batch_size is None:
            return train, full_reference
        idx = jax.random.choice(jax.random.fold_in(jax.random.key(seed), step), num_train, (batch_size,),
                                replace=False)
        batch = _take(train, idx)
        return batch, _bregman_terms(outputs_fn, output_loss, params, batch)

    def solve(eps_vec, ex_batch):
        """eps_vec (P,), ex_batch: P single-example batches -> (f (P, Q), residual (P,))."""
        def one_init(_):
            return opt.init(zeros)

        states = jax.vmap(one_init)(eps_vec)
        us = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (eps_vec.shape[0],) + a.shape), zeros)

        def step(carry, t):
            us, states = carry
            batch, reference = batch_at(t)

            def update(u, state, eps, example):
                value_fn = lambda v: scaled_objective(v, eps, example, batch, reference)  # noqa: E731
                if optimizer == "lbfgs":
                    value, grad = optax.value_and_grad_from_state(value_fn)(u, state=state)
                    updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=value_fn)
                else:
                    grad = jax.grad(value_fn)(u)
                    updates, state = opt.update(grad, state, u)
                return optax.apply_updates(u, updates), state

            us, states = jax.vmap(update)(us, states, eps_vec, ex_batch)
            return (us, states), None

        (us, _), _ = jax.lax.scan(step, (us, states), jnp.arange(num_steps))

        def finish(u, eps, example):
            grad = jax.grad(scaled_objective)(u, eps, example, train, _bregman_terms(outputs_fn, output_loss, params, train)
                                              if full_reference is None else full_reference)
            g0 = jax.grad(lambda p: jnp.sum(output_loss(outputs_fn(p, example), example)))(params)
            theta = jax.tree_util.tree_map(lambda p, d: p + eps * d, params, u)
            return measurement(theta), jnp.sqrt(_sq_norm(grad) / jnp.maximum(_sq_norm(g0), 1e-300))

        return jax.vmap(finish)(us, eps_vec, ex_batch)

    solve = jax.jit(solve)

    results: dict[int, dict] = {}
    todo = []
    for i in examples.tolist():
        stored = _load_example(store, i, num_queries) if store is not None else None
        if stored is None:
            todo.append(i)
        else:
            results[i] = stored
    chunks = [todo[k:k + chunk_size] for k in range(0, len(todo), chunk_size)]
    progress = None
    if chunks and not quiet:
        from tqdm.auto import tqdm
        progress = tqdm(total=len(todo), desc="PBRF solves", unit="example")
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    for chunk in chunks:
        pad = chunk + [chunk[-1]] * (chunk_size - len(chunk))  # fixed shapes: one compilation
        idx = np.asarray(pad + pad)
        eps_vec = jnp.concatenate([jnp.full(len(pad), epsilon, dtype), jnp.full(len(pad), -epsilon, dtype)])
        ex_batch = jax.tree_util.tree_map(lambda a: a[idx][:, None], train)
        f, residual = solve(eps_vec, ex_batch)
        f, residual = np.asarray(f, np.float64), np.asarray(residual, np.float64)
        if not (np.all(np.isfinite(f)) and np.all(np.isfinite(residual))):
            bad = sorted({pad[k % len(pad)] for k in np.flatnonzero(~np.isfinite(f).all(1) | ~np.isfinite(residual))})
            raise FloatingPointError(f"PBRF solve diverged (non-finite) for training examples {bad}; lower "
                                     f"learning_rate={learning_rate} or raise damping={damping}")
        for k, i in enumerate(chunk):
            plus, minus = f[k], f[len(pad) + k]
            row = {"scores": -(plus - minus) / (2.0 * epsilon), "plus": plus, "minus": minus,
                   "residuals": np.asarray([residual[k], residual[len(pad) + k]])}
            if store is not None:
                _save_example(store, i, row)
            results[i] = row
        if progress is not None:
            progress.update(len(chunk))
    if progress is not None:
        progress.close()
    rows = [results[i] for i in examples.tolist()]
    return PBRFResult(examples=examples, scores=np.stack([r["scores"] for r in rows], axis=1),
                      measurements_plus=np.stack([r["plus"] for r in rows]),
                      measurements_minus=np.stack([r["minus"] for r in rows]),
                      residuals=np.stack([r["residuals"] for r in rows]), epsilon=float(epsilon), damping=float(damping))
