"""EK-FAC influence functions for chosen Flax `Dense` layers.

Layers. A Dense layer computes `s = x W + b`. With the homogeneous input `x̃ = [x, 1]` and the stacked
weight `W̃ = [W; b]` (shape (in+1, out), Flax layout) its per-example gradient is

    DW̃ = Σ_t x̃_t δ_tᵀ = X̃ᵀ Δ        X̃: (T, in+1) layer inputs, Δ: (T, out) output gradients

[Grosse et al. 2023 ("G23"), eq. 12, 26]. Inputs and output gradients are captured with one clean
mechanism: `flax.linen.intercept_methods` wraps every selected linear layer's `__call__` (`nn.Dense`, and
transformers' `FlaxConv1D` of the GPT-2 family, whose kernel is stored transposed), records its input
and adds a zero-valued perturbation `ε` to its output; the gradient of the loss w.r.t. `ε` is `Δ`.
The model code is not modified and no layer gradient is ever materialised during factor fitting.

K-FAC [G23 eq. 16; Martens & Grosse 2015]: the layer block of the Gauss–Newton matrix is approximated
by `A ⊗ S` with `A = E[x̃ x̃ᵀ]` (average over tokens) and `S = E[δ δᵀ]`, where `δ` are output gradients
of the loss with labels *sampled from the model* `ŷ ~ p(·|x)` (so that E over ŷ gives the GGN;
G23 §2.3), not the data labels.

EK-FAC [G23 eq. 19–21; George et al. 2018]: eigendecompose `A = Q_A diag(λ_A) Q_Aᵀ`,
`S = Q_S diag(λ_S) Q_Sᵀ` in float64, then refit one variance per Kronecker eigen-direction from
per-*sequence* pseudo-gradients

    Λ[i, j] = E[ (Q_Aᵀ DW̃ Q_S)[i, j]² ]                       shape (in+1, out)

and apply the damped inverse `(Ĝ + λ I)⁻¹ V = Q_A [ (Q_Aᵀ V Q_S) / (Λ + λ) ] Q_Sᵀ` with the default
damping `λ = 0.1 × mean(Λ)` per layer [G23 §5]. K-FAC is the same with `Λ = λ_A λ_Sᵀ`.

Influence [G23 eq. 30–31]: `I(z_q, z_m) = Σ_ℓ ⟨(Ĝ_ℓ + λ_ℓ I)⁻¹ ∇_ℓ L(z_q), ∇_ℓ L(z_m)⟩_F`, which
decomposes into layers and, since `∇_ℓ L(z_m) = Σ_t x̃_t δ_tᵀ`, into tokens of the training sequence:
per-token contribution `rowsum((X̃ P_q) ⊙ Δ)`.

Fitting streams batches (tqdm bar), accumulates in float64 and, when a folder is given, saves its
state atomically (`artifacts.atomic_write_npz`: temp file + `os.replace`, no pickle) every `save_every`
batches, so a killed fit resumes where it stopped. The fit's fingerprint (`meta`: layers, task,
labels, samples, seed, damping, number of batches, plus `params_sha256` = `artifacts.tree_digest(params)`
and `data_sha256`, a digest of every batch's arrays) is stored in the factors and in the partial
state; a rerun into the same folder with other parameters, other data or other settings raises
`artifacts.FingerprintMismatchError` (a ValueError) naming the differing fields. An unreadable
(corrupt, truncated, empty) state or factors file is named in a warning and recomputed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import warnings
import zipfile
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifacts

__all__ = [
    "TASKS", "LABELS", "METHODS", "DEFAULT_LAYERS", "DEFAULT_DAMPING_FACTOR",
    "LayerInfo", "LayerFactors", "EKFACFactors",
    "find_layers", "capture", "layer_activations", "per_example_layer_grads",
    "params_to_layer_grads", "layer_grads_to_params", "fit_ekfac", "influence_scores",
    "token_influence",
]

TASKS = ("classification", "lm")
LABELS = ("sampled", "exact", "data")
METHODS = ("ekfac", "kfac")
DEFAULT_LAYERS = (r"(.*/)?mlp_(in|out)",)  # G23 §3.1: the MLP matrices of every transformer block
DEFAULT_DAMPING_FACTOR = 0.1
STATE_FILE = "ekfac_state.npz"
FACTORS_FILE = "ekfac_factors.npz"

PyTree = Any
ApplyFn = Callable[[PyTree, dict], jax.Array]


# ----------------------------------------------------------------------------------------------
# Capturing Dense inputs and output gradients
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A selected linear layer: its module path ('block_0/mlp_in'), sizes, whether it has a bias, and
    whether its kernel is stored transposed, (out, in) (transformers' GPT-2 `FlaxConv1D`)."""

    path: str
    in_dim: int
    out_dim: int
    use_bias: bool
    transposed: bool = False

    @property
    def rows(self) -> int:
        return self.in_dim + int(self.use_bias)


def _linear_kind(mod) -> str | None:
    """"dense" for `nn.Dense`, "conv1d" for transformers' `FlaxConv1D` (y = x Wᵀ + b, kernel (out, in);
    recognised by name so that this module does not import transformers), else None."""
    if isinstance(mod, nn.Dense):
        return "dense"
    if type(mod).__name__ == "FlaxConv1D" and hasattr(mod, "features"):
        return "conv1d"
    return None


def _is_linear_call(context) -> bool:
    return context.method_name == "__call__" and _linear_kind(context.module) is not None


def _compile_patterns(layers) -> list[re.Pattern]:
    if isinstance(layers, str):
        layers = (layers,)
    if not layers:
        raise ValueError("layers must be a non-empty sequence of regular expressions over linear-layer module paths")
    return [re.compile(p) for p in layers]


def find_layers(apply_fn: ApplyFn, params: PyTree, batch: dict, layers=DEFAULT_LAYERS) -> dict[str, LayerInfo]:
    """The linear layers (`nn.Dense`, transformers' `FlaxConv1D`) whose '/'-joined module path fully
    matches one of the regexes `layers`. Runs the model abstractly (`jax.eval_shape`); raises ValueError
    listing all linear-layer paths when none matches, and when a selected layer is called more than
    once (weight sharing is not supported)."""
    patterns = _compile_patterns(layers)
    found: dict[str, LayerInfo] = {}
    all_dense: list[str] = []
    calls: dict[str, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if _is_linear_call(context):
            path = "/".join(mod.path)
            all_dense.append(path)
            if any(p.fullmatch(path) for p in patterns):
                calls[path] = calls.get(path, 0) + 1
                found[path] = LayerInfo(path, int(args[0].shape[-1]), int(mod.features), bool(mod.use_bias),
                                        transposed=_linear_kind(mod) == "conv1d")
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        # A fresh lambda: jax.eval_shape caches traces per function, which would skip the interceptor.
        jax.eval_shape(lambda p, b: apply_fn(p, b), params, batch)
    if not found:
        raise ValueError(f"layers={list(layers) if not isinstance(layers, str) else layers!r} match no linear layer; "
                         f"linear-layer module paths are {sorted(set(all_dense))}")
    shared = [p for p, c in calls.items() if c > 1]
    if shared:
        raise ValueError(f"layers {shared} are called more than once per forward pass; EK-FAC needs one call per layer")
    return dict(sorted(found.items()))


def capture(apply_fn: ApplyFn, params: PyTree, batch: dict, perturbations: Mapping[str, jax.Array]):
    """`(outputs, inputs)`: the model outputs with `perturbations[path]` added to the output of each
    selected linear layer, and the inputs `x` of those layers (dict path -> array (..., in))."""
    inputs: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if _is_linear_call(context):
            path = "/".join(mod.path)
            if path in perturbations:
                inputs[path] = args[0]
                return next_fun(*args, **kwargs) + perturbations[path]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, batch)
    return out, inputs


def _as_sequences(x: jax.Array, batch_size: int) -> jax.Array:
    """(B, in) -> (B, 1, in); (B, T, in) stays; (B, ..., in) -> (B, T', in)."""
    return x.reshape(batch_size, -1, x.shape[-1])


def _homogeneous(x: jax.Array, info: LayerInfo) -> jax.Array:
    if not info.use_bias:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _per_example_loss(logits: jax.Array, batch: dict, task: str, labels: jax.Array | None = None) -> jax.Array:
    """Summed (not mean) loss per example [G23 §2.3: the sum over tokens is the matching loss].
    classification: CE(logits, y); lm: Σ_t loss_mask[t+1] · CE(logits[t], tokens[t+1])."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if task == "classification":
        y = batch["y"] if labels is None else labels
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    targets = batch["tokens"][:, 1:] if labels is None else labels
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else jnp.ones_like(token_loss)
    return jnp.sum(token_loss * mask, axis=1)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r}; allowed values: {list(TASKS)}")


def layer_activations(apply_fn: ApplyFn, params: PyTree, batch: dict, layers: Mapping[str, LayerInfo],
                      task: str, labels: jax.Array | None = None, weights: jax.Array | None = None):
    """Per layer `(X̃, Δ)` with `X̃: (B, T, in+1)` homogeneous inputs and `Δ: (B, T, out)` gradients of
    the per-example loss (data labels, or `labels` if given; scaled by `weights` (B,) if given) w.r.t.
    the layer output. `DW̃_b = X̃_bᵀ Δ_b` is example b's layer gradient. Also returns the logits."""
    _check_task(task)
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shapes: dict[str, Any] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if _is_linear_call(context) and "/".join(mod.path) in layers:
            shapes["/".join(mod.path)] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out

    with nn.intercept_methods(record):
        # A fresh lambda: jax.eval_shape caches traces per function, which would skip the interceptor.
        jax.eval_shape(lambda p, b: apply_fn(p, b), params, batch)
    zeros = {p: jnp.zeros(s.shape, s.dtype) for p, s in shapes.items()}

    def total_loss(eps):
        logits, inputs = capture(apply_fn, params, batch, eps)
        losses = _per_example_loss(logits, batch, task, labels)
        if weights is not None:
            losses = losses * weights
        return jnp.sum(losses), (logits, inputs)

    grads, (logits, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
    acts = {}
    for path, info in layers.items():
        x = _homogeneous(_as_sequences(inputs[path], batch_size), info)
        acts[path] = (x, _as_sequences(grads[path], batch_size).astype(x.dtype))
    return acts, logits


def per_example_layer_grads(apply_fn: ApplyFn, params: PyTree, batch: dict, layers: Mapping[str, LayerInfo],
                            task: str) -> dict[str, jax.Array]:
    """Per-example gradients of the data loss for each layer, `(B, in+1, out)` = X̃_bᵀ Δ_b."""
    acts, _ = layer_activations(apply_fn, params, batch, layers, task)
    return {p: jnp.einsum("bti,bto->bio", x, d) for p, (x, d) in acts.items()}


def _subtree(tree, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def params_to_layer_grads(tree: PyTree, layers: Mapping[str, LayerInfo]) -> dict[str, jax.Array]:
    """A params-shaped PyTree (e.g. `jax.grad` output) -> dict path -> W̃ = [kernel; bias] (in+1, out)
    (a transposed kernel, (out, in), is transposed back)."""
    out = {}
    for path, info in layers.items():
        node = _subtree(tree, path)
        kernel = node["kernel"].T if info.transposed else node["kernel"]
        out[path] = jnp.concatenate([kernel, node["bias"][None]], 0) if info.use_bias else kernel
    return out


def layer_grads_to_params(mats: Mapping[str, jax.Array], layers: Mapping[str, LayerInfo]) -> dict:
    """Inverse of `params_to_layer_grads`: dict path -> {'kernel', 'bias'} (flat by path)."""
    out = {}
    for path, info in layers.items():
        m = mats[path]
        kernel = m[: info.in_dim].T if info.transposed else m[: info.in_dim]
        out[path] = {"kernel": kernel, **({"bias": m[info.in_dim]} if info.use_bias else {})}
    return out


# ----------------------------------------------------------------------------------------------
# Factors
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerFactors:
    """K-FAC/EK-FAC factors of one layer (float64 numpy). Shapes: A, Q_A (in+1, in+1); S, Q_S (out, out);
    eig_A (in+1,), eig_S (out,), Lambda (in+1, out); damping a float."""

    A: np.ndarray
    S: np.ndarray
    Q_A: np.ndarray
    eig_A: np.ndarray
    Q_S: np.ndarray
    eig_S: np.ndarray
    Lambda: np.ndarray
    damping: float

    def eigenvalues(self, method: str) -> np.ndarray:
        if method == "ekfac":
            return self.Lambda
        if method == "kfac":
            return np.outer(np.maximum(self.eig_A, 0.0), np.maximum(self.eig_S, 0.0))
        raise ValueError(f"method={method!r}; allowed values: {list(METHODS)}")

    def ihvp(self, v: jax.Array, method: str = "ekfac", damping: float | None = None) -> jax.Array:
        """`(Ĝ + λI)⁻¹ V` for V of shape (..., in+1, out) [G23 eq. 21]; computed in V's dtype."""
        lam = self.damping if damping is None else float(damping)
        dtype = v.dtype
        qa, qs = jnp.asarray(self.Q_A, dtype), jnp.asarray(self.Q_S, dtype)
        denom = jnp.asarray(self.eigenvalues(method) + lam, dtype)
        rot = jnp.einsum("ia,...ij,jb->...ab", qa, v, qs, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("ia,...ab,jb->...ij", qa, rot / denom, qs, precision=jax.lax.Precision.HIGHEST)

    def dense(self, method: str = "ekfac") -> np.ndarray:
        """The (undamped) curvature block as a dense ((in+1)·out)² matrix in row-major vec(W̃) order
        (for tests on tiny layers)."""
        q = np.kron(self.Q_A, self.Q_S)
        return q @ np.diag(self.eigenvalues(method).reshape(-1)) @ q.T


@dataclasses.dataclass
class EKFACFactors:
    """Factors of all selected layers plus the fit settings (`meta`)."""

    layers: dict[str, LayerInfo]
    factors: dict[str, LayerFactors]
    meta: dict

    def ihvp(self, grads: Mapping[str, jax.Array], method: str = "ekfac") -> dict[str, jax.Array]:
        """Per-layer damped inverse applied to layer matrices `grads[path]` of shape (..., in+1, out)."""
        return {p: self.factors[p].ihvp(grads[p], method) for p in self.layers}

    def save(self, folder: str) -> str:
        """Writes `folder/ekfac_factors.npz` atomically (arrays keyed '<path>::<name>', meta as JSON)."""
        arrays = {"meta": np.array(artifacts.dumps(self.meta, indent=None)),
                  "layers": np.array(json.dumps({p: dataclasses.asdict(i) for p, i in self.layers.items()}))}
        for p, f in self.factors.items():
            for name in ("A", "S", "Q_A", "eig_A", "Q_S", "eig_S", "Lambda"):
                arrays[f"{p}::{name}"] = getattr(f, name)
            arrays[f"{p}::damping"] = np.array(f.damping)
        file = os.path.join(folder, FACTORS_FILE)
        _atomic_savez(file, arrays)
        return file

    @classmethod
    def load(cls, folder: str) -> "EKFACFactors":
        """Reads `folder/ekfac_factors.npz`; `artifacts.CorruptArtifactError` naming the file when it is
        empty, truncated or fails its zip CRC-32 checks (every member is read in full)."""
        file = os.path.join(folder, FACTORS_FILE)
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                layers = {p: LayerInfo(**d) for p, d in json.loads(str(z["layers"])).items()}
                factors = {}
                for p in layers:
                    kw = {n: np.asarray(z[f"{p}::{n}"]) for n in ("A", "S", "Q_A", "eig_A", "Q_S", "eig_S", "Lambda")}
                    factors[p] = LayerFactors(**kw, damping=float(z[f"{p}::damping"]))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as error:
            raise artifacts.CorruptArtifactError(file, f"EK-FAC factors file {file} is unreadable or corrupt "
                                                       f"({type(error).__name__}: {error})") from None
        return cls(layers, factors, meta)


def _atomic_savez(file: str, arrays: Mapping[str, np.ndarray]) -> None:
    """`artifacts.atomic_write_npz` (temp file, fsync, rename; no pickle)."""
    artifacts.atomic_write_npz(file, arrays)


def _read_state(file: str) -> tuple[dict, dict, dict]:
    """(meta, {"phase", "next"}, sums) of a partial fit; CorruptArtifactError naming an unreadable file."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            state = {"phase": int(z["phase"]), "next": int(z["next"])}
            sums = {k: np.asarray(z[k]) for k in z.files if k not in ("meta", "phase", "next")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as error:
        raise artifacts.CorruptArtifactError(file, f"EK-FAC partial state {file} is unreadable or corrupt "
                                                   f"({type(error).__name__}: {error})") from None
    return meta, state, sums


def data_digest(batches: Sequence[Any]) -> str:
    """sha256 (hex) over `artifacts.tree_digest` of every batch, in order (iterates `batches` once)."""
    h = hashlib.sha256()
    count = 0
    for batch in batches:
        h.update(artifacts.tree_digest(batch).encode())
        count += 1
    h.update(f"|{count}".encode())
    return h.hexdigest()


def _sample_labels(key: jax.Array, logits: jax.Array, task: str) -> jax.Array:
    """ŷ ~ softmax(logits) per example (classification) or per position t predicting t+1 (lm)."""
    if task == "classification":
        return jax.random.categorical(key, logits.astype(jnp.float32), axis=-1)
    return jax.random.categorical(key, logits[:, :-1].astype(jnp.float32), axis=-1)


def _token_mask(batch: dict, x: jax.Array) -> jax.Array:
    """(B, T) weights of the tokens counted in A and S: the attention mask when present, else ones."""
    if x.shape[1] > 1 and "mask" in batch and batch["mask"].shape == x.shape[:2]:
        return batch["mask"].astype(x.dtype)
    return jnp.ones(x.shape[:2], x.dtype)


def _label_draws(apply_fn, params, batch, task, labels_mode, key, num_samples):
    """`(batch', labels, weights)`: the batch tiled along the example axis (copy-major) with labels
    and per-row weights whose weighted sum over the copies of an example gives E over ŷ ~ p(·|x):
    'sampled' — `num_samples` copies with ŷ ~ p, weight 1/num_samples; 'exact' — one copy per class c
    with weight p_c(x); 'data' — the batch itself, its labels, weight 1. Weights sum to 1 per example."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if labels_mode == "data":
        return batch, None, jnp.ones(n)
    logits = apply_fn(params, batch)
    copies = num_samples if labels_mode == "sampled" else logits.shape[-1]
    tiled = jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * copies, axis=0), batch)
    if labels_mode == "sampled":
        labels = _sample_labels(key, jnp.concatenate([logits] * copies, axis=0), task)
        return tiled, labels, jnp.full(n * copies, 1.0 / copies)
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    labels = jnp.repeat(jnp.arange(copies, dtype=jnp.int32), n)
    return tiled, labels, probs.T.reshape(-1)


def _make_stats_fns(apply_fn, layers, task, labels_mode, num_samples):
    """Jitted per-batch statistics: (Σ_tok w x̃x̃ᵀ, Σ_tok w δδᵀ, Σ_tok w) and Σ_seq w (Q_Aᵀ DW̃ Q_S)².
    `valid` (B,) is 1 on real examples and 0 on the rows that pad a short last batch to the batch
    shape (their weights are 0, so one compilation serves every batch)."""

    def weighted_acts(params, batch, key, valid):
        tiled, labels, w = _label_draws(apply_fn, params, batch, task, labels_mode, key, num_samples)
        w = w * jnp.tile(valid.astype(w.dtype), w.shape[0] // valid.shape[0])  # copies are copy-major
        acts, _ = layer_activations(apply_fn, params, tiled, layers, task, labels=labels)
        return tiled, acts, w

    def covariance(params, batch, key, valid):
        tiled, acts, w = weighted_acts(params, batch, key, valid)
        stats = {}
        for path, (x, d) in acts.items():
            mask = _token_mask(tiled, x) * w.astype(x.dtype)[:, None]
            stats[path] = (jnp.einsum("bt,bti,btj->ij", mask, x, x), jnp.einsum("bt,bti,btj->ij", mask, d, d),
                           jnp.sum(mask))
        return stats

    def eigen_correction(params, batch, key, valid, bases):
        _, acts, w = weighted_acts(params, batch, key, valid)
        out = {}
        for path, (x, d) in acts.items():
            qa, qs = bases[path]
            rot = jnp.einsum("bti,ia,btj,jc->bac", x, qa, d, qs)  # Q_Aᵀ X̃ᵀ Δ Q_S per sequence
            out[path] = jnp.einsum("b,bac->ac", w.astype(x.dtype), rot ** 2)
        return out

    return jax.jit(covariance), jax.jit(eigen_correction)


@functools.lru_cache(maxsize=16)
def _cached_stats_fns(apply_fn, layers_items, task, labels_mode, num_samples):
    """`_make_stats_fns`, one pair of jitted functions per setting, so a second fit (same model,
    layers and batch shape) reuses the compiled executables instead of recompiling."""
    return _make_stats_fns(apply_fn, dict(layers_items), task, labels_mode, num_samples)


def _stats_fns(apply_fn, layers, task, labels_mode, num_samples):
    try:
        return _cached_stats_fns(apply_fn, tuple(layers.items()), task, labels_mode, num_samples)
    except TypeError:  # an unhashable apply_fn: jitted afresh (compiled once per fit)
        return _make_stats_fns(apply_fn, layers, task, labels_mode, num_samples)


def _padded(batch, size: int):
    """(batch with its leading axis zero-padded to `size`, valid (size,) = 1 on the real rows)."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    valid = np.zeros(size, np.float32)
    valid[:n] = 1.0
    if n == size:
        return batch, valid
    pad = lambda a: np.concatenate([np.asarray(a), np.zeros((size - n,) + np.shape(a)[1:], np.asarray(a).dtype)])  # noqa: E731
    return jax.tree_util.tree_map(pad, batch), valid


def _fit_meta(layers, task, labels_mode, num_samples, num_batches, seed, damping, damping_factor,
              params_sha256, data_sha256) -> dict:
    return {"layers": sorted(layers), "task": task, "labels": labels_mode, "num_samples": int(num_samples),
            "num_batches": int(num_batches), "seed": int(seed),
            "damping": None if damping is None else float(damping), "damping_factor": float(damping_factor),
            "params_sha256": params_sha256, "data_sha256": data_sha256}


def fit_ekfac(apply_fn: ApplyFn, params: PyTree, batches: Sequence[dict], *, task: str,
              layers=DEFAULT_LAYERS, seed: int = 0, labels: str = "sampled", num_samples: int = 1,
              damping: float | None = None, damping_factor: float = DEFAULT_DAMPING_FACTOR,
              folder: str | None = None, save_every: int = 10, progress: bool = True) -> EKFACFactors:
    """Fits K-FAC factors A, S (pass 1 over `batches`), float64 eigendecompositions, and the EK-FAC
    eigenvalue correction Λ (pass 2). `labels`: 'sampled' (ŷ ~ model, `num_samples` draws per example;
    G23), 'exact' (expectation over all classes weighted by p; classification only — for tests) or
    'data' (empirical Fisher; not the GGN). Damping per layer: `damping` if given, else
    `damping_factor × mean(Λ_ℓ)`. With `folder`, progress is checkpointed every `save_every` batches
    and a rerun resumes (or just loads the finished factors) when its fingerprint (settings, parameter
    hash, data digest) matches; otherwise `artifacts.FingerprintMismatchError` names the fields."""
    _check_task(task)
    if labels not in LABELS:
        raise ValueError(f"labels={labels!r}; allowed values: {list(LABELS)}")
    if labels == "exact" and task != "classification":
        raise ValueError("labels='exact' needs task='classification' (the vocabulary sum is too large for 'lm')")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples={num_samples}; must be a positive integer")
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping={damping}; must be >= 0 or None (then damping_factor × mean(Λ))")
    if not damping_factor >= 0:
        raise ValueError(f"damping_factor={damping_factor}; must be >= 0")
    if len(batches) == 0:
        raise ValueError("batches is empty")
    if save_every < 1:
        raise ValueError(f"save_every={save_every}; must be >= 1")
    from tqdm.auto import tqdm

    infos = find_layers(apply_fn, params, batches[0], layers)
    meta = _fit_meta(infos, task, labels, num_samples, len(batches), seed, damping, damping_factor,
                     artifacts.tree_digest(params), data_digest(batches) if folder is not None else None)
    hint = "use another folder, or delete it to refit"
    if folder is not None and os.path.exists(os.path.join(folder, FACTORS_FILE)):
        try:
            done = EKFACFactors.load(folder)
        except artifacts.CorruptArtifactError as error:
            warnings.warn(f"{error}; refitting", RuntimeWarning, stacklevel=2)
            os.remove(os.path.join(folder, FACTORS_FILE))
        else:
            artifacts.check_fields(os.path.abspath(folder), done.meta, meta, what="EK-FAC fit", hint=hint)
            return done

    state = {"phase": 0, "next": 0}
    sums: dict[str, np.ndarray] = {}
    if folder is not None and os.path.exists(os.path.join(folder, STATE_FILE)):
        try:
            old_meta, old_state, old_sums = _read_state(os.path.join(folder, STATE_FILE))
        except artifacts.CorruptArtifactError as error:
            warnings.warn(f"{error}; starting the fit over", RuntimeWarning, stacklevel=2)
        else:
            artifacts.check_fields(os.path.abspath(folder), old_meta, meta, what="partial EK-FAC fit", hint=hint)
            state, sums = old_state, old_sums

    def checkpoint():
        if folder is not None:
            _atomic_savez(os.path.join(folder, STATE_FILE),
                          {"meta": np.array(json.dumps(meta, sort_keys=True)), "phase": np.array(state["phase"]),
                           "next": np.array(state["next"]), **sums})

    covariance, correction = _stats_fns(apply_fn, infos, task, labels, int(num_samples))
    batch_rows = max(jax.tree_util.tree_leaves(b)[0].shape[0] for b in batches)  # a short last batch is padded
    key = jax.random.key(seed)
    # Pass 1: A and S.
    if state["phase"] == 0:
        if not sums:
            for p, i in infos.items():
                sums.update({f"{p}::A": np.zeros((i.rows, i.rows)), f"{p}::S": np.zeros((i.out_dim, i.out_dim)),
                             f"{p}::tokens": np.zeros(())})
        for b in tqdm(range(state["next"], len(batches)), desc="ekfac A,S", disable=not progress,
                      initial=state["next"], total=len(batches)):
            padded, valid = _padded(batches[b], batch_rows)
            stats = covariance(params, padded, jax.random.fold_in(key, b), valid)
            for p, (a, s, n) in stats.items():
                sums[f"{p}::A"] += np.asarray(a, np.float64)
                sums[f"{p}::S"] += np.asarray(s, np.float64)
                sums[f"{p}::tokens"] += float(n)
            state["next"] = b + 1
            if (b + 1) % save_every == 0:
                checkpoint()
        state.update(phase=1, next=0)
        for p in infos:
            sums[f"{p}::Lambda"] = np.zeros((infos[p].rows, infos[p].out_dim))
        sums["examples"] = np.zeros(())
        checkpoint()
    # Eigendecompositions in float64 (numpy), deterministic given A and S.
    eig = {}
    for p in infos:
        n = max(float(sums[f"{p}::tokens"]), 1.0)
        A, S = sums[f"{p}::A"] / n, sums[f"{p}::S"] / n
        A, S = (A + A.T) / 2, (S + S.T) / 2
        ea, qa = np.linalg.eigh(A)
        es, qs = np.linalg.eigh(S)
        eig[p] = (A, S, qa, ea, qs, es)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    bases = {p: (jnp.asarray(e[2], dtype), jnp.asarray(e[4], dtype)) for p, e in eig.items()}
    # Pass 2: Λ from per-sequence pseudo-gradients.
    sums.setdefault("examples", np.zeros(()))
    for b in tqdm(range(state["next"], len(batches)), desc="ekfac Λ", disable=not progress,
                  initial=state["next"], total=len(batches)):
        padded, valid = _padded(batches[b], batch_rows)
        lam = correction(params, padded, jax.random.fold_in(key, len(batches) + b), valid, bases)
        for p, v in lam.items():
            sums[f"{p}::Lambda"] += np.asarray(v, np.float64)
        sums["examples"] += jax.tree_util.tree_leaves(batches[b])[0].shape[0]
        state["next"] = b + 1
        if (b + 1) % save_every == 0:
            checkpoint()
    factors = {}
    for p, (A, S, qa, ea, qs, es) in eig.items():
        Lam = sums[f"{p}::Lambda"] / max(float(sums["examples"]), 1.0)
        lam = float(damping) if damping is not None else damping_factor * float(np.mean(Lam))
        factors[p] = LayerFactors(A=A, S=S, Q_A=qa, eig_A=ea, Q_S=qs, eig_S=es, Lambda=Lam, damping=lam)
    result = EKFACFactors(infos, factors, meta)
    if folder is not None:
        result.save(folder)
        state_file = os.path.join(folder, STATE_FILE)
        if os.path.exists(state_file):  # the finished factors supersede the partial state
            os.remove(state_file)
    return result


# ----------------------------------------------------------------------------------------------
# Influence
# ----------------------------------------------------------------------------------------------

def influence_scores(preconditioned: Mapping[str, jax.Array], train_acts: Mapping[str, tuple[jax.Array, jax.Array]],
                     per_layer: bool = False):
    """Scores `Σ_ℓ ⟨P_{q,ℓ}, X̃_{m,ℓ}ᵀ Δ_{m,ℓ}⟩` for preconditioned queries `P` (Q, in+1, out) against
    training examples given by their layer inputs/output gradients (B, T, ·), never materialising
    the training gradients: `Σ_t (x̃_t P) · δ_t` [G23 eq. 30]. Returns (Q, B), or a dict path -> (Q, B)
    with `per_layer=True`."""
    out = {p: jnp.einsum("qio,bti,bto->qb", preconditioned[p], x, d) for p, (x, d) in train_acts.items()}
    return out if per_layer else sum(out.values())


def token_influence(preconditioned: Mapping[str, jax.Array], train_acts: Mapping[str, tuple[jax.Array, jax.Array]]):
    """Per-token contributions (Q, B, T) = Σ_ℓ rowsum((X̃_ℓ P_{q,ℓ}) ⊙ Δ_ℓ) [G23 eq. 31]; summing
    over T gives `influence_scores`."""
    return sum(jnp.einsum("qio,bti,bto->qbt", preconditioned[p], x, d) for p, (x, d) in train_acts.items())
