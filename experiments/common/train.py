"""Training: optax, periodic eval, safetensors checkpoints, exact resume, tqdm, metrics.jsonl.

    optimizer = make_optimizer("adam", learning_rate=3e-3, num_steps=1000)
    result = train(loss_fn, params, optimizer, batch_at, num_steps=1000, workdir=workdir,
                   checkpoint_every=200, eval_fn=evaluate, eval_every=200)

* `batch_at(step) -> batch` must be a pure function of the step (see `experiments.common.data.batch_indices`),
  so a resumed run sees exactly the batches the uninterrupted run would have seen.
* Checkpoints `WORKDIR/checkpoints/ckpt_<step>.safetensors` hold every leaf of the params and the
  optimizer state, named by its PyTree path (`params['block_0']['mlp_in']['kernel']`, ...), plus
  the step and `data_sha256` (sha256 over every tensor's name, dtype, shape and bytes) in the
  metadata. Written atomically (temporary file + rename); never pickled. The newest
  `keep_checkpoints` are kept. `restore_checkpoint` recomputes the digest and raises
  `artifacts.CorruptArtifactError` naming the file when it differs.
* Rerunning `train` with the same arguments restores the newest checkpoint that reads back intact
  and continues from its step (a corrupt newest checkpoint is named in a warning, renamed to
  `*.corrupt`, and the previous good one is used); because the update is deterministic and the
  batches depend only on the step, the final parameters are bit-identical to an uninterrupted run
  (tested).
* Divergence: non-finite parameters (at the start, or at a logging step) or a non-finite training
  loss raise `TrainingDivergedError` naming the first bad step; no checkpoint of a diverged state is
  written.
* Every `log_every` steps `train/loss` (mean of the steps since the last log) and the learning rate
  are appended to `metrics.jsonl`; every `eval_every` steps and at the end `eval_fn(params)`'s
  numbers are logged with the prefix `eval/`. A resumed call first drops the `train/` and `eval/`
  records after the step it resumes from, so no step is logged twice.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from safetensors import safe_open
from tqdm.auto import tqdm

import artifacts
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common.workdir import Workdir, atomic_write_bytes

PyTree = Any
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
_CKPT_RE = re.compile(r"ckpt_(\d+)\.safetensors$")


TRAIN_FIELDS = ("optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay", "num_steps",
                "batch_size", "checkpoint_every", "eval_every", "log_every")


def validate_train_section(config, min_max_len: int) -> None:
    """Checks `config.max_len` (>= min_max_len), the fields of `config.train`, its batch size and
    the optimizer fields."""
    checks.integer("config.max_len", config.max_len, min_max_len)
    t = config.train
    checks.check_fields("config.train", t, TRAIN_FIELDS)
    checks.integer("config.train.batch_size", t.batch_size)
    try:
        optimizer_from_config(t)
    except ValueError as error:
        message = str(error)
        raise checks.ConfigError(message if message.startswith("config.") else f"config.train.{message}") from None


def optimizer_from_config(train_section) -> optax.GradientTransformation:
    """`make_optimizer` from a config's `train` section (optimizer, learning_rate, num_steps, schedule,
    warmup_steps, weight_decay)."""
    t = train_section
    return make_optimizer(t.optimizer, t.learning_rate, t.num_steps, t.schedule, t.warmup_steps, t.weight_decay)


def batch_fn(arrays: dict, batch_size: int, seed: int) -> Callable[[int], dict]:
    """step -> the batch of that step: the rows `data.batch_indices(N, batch_size, step, seed)` of every
    array (a pure function of (seed, step), so a resumed run sees the same data)."""
    num_examples = len(next(iter(arrays.values())))

    def batch_at(step: int) -> dict:
        return data_lib.take(arrays, data_lib.batch_indices(num_examples, batch_size, step, seed))

    return batch_at


def make_optimizer(name: str, learning_rate: float, num_steps: int, schedule: str = "constant",
                   warmup_steps: int = 0, weight_decay: float = 0.0, momentum: float = 0.9,
                   grad_clip: float = 0.0) -> optax.GradientTransformation:
    """optax optimizer. schedule="cosine": linear warmup to `learning_rate` over `warmup_steps`, then
    cosine decay to 0.1·learning_rate at `num_steps`. grad_clip > 0 clips the global norm first."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; allowed values: {list(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed values: {list(SCHEDULES)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if not 0 <= warmup_steps < max(num_steps, 1):
        raise ValueError(f"warmup_steps must be in [0, num_steps={num_steps}), got {warmup_steps!r}")
    lr = learning_rate_schedule(learning_rate, num_steps, schedule, warmup_steps)
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "adamw":
        opt = optax.adamw(lr, weight_decay=weight_decay)
    else:
        opt = optax.sgd(lr, momentum=momentum or None)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def learning_rate_schedule(learning_rate: float, num_steps: int, schedule: str = "constant",
                           warmup_steps: int = 0) -> Callable[[int], float] | float:
    """The learning rate of `make_optimizer`: a constant, or (cosine) step -> rate."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(num_steps, 1), end_value=0.1 * learning_rate)
    return learning_rate


def learning_rate_at(train_section, step: int) -> float:
    """The learning rate a config's `train` section uses at `step` (TracIn weights checkpoints by it)."""
    t = train_section
    lr = learning_rate_schedule(t.learning_rate, t.num_steps, t.schedule, t.warmup_steps)
    return float(lr(step)) if callable(lr) else float(lr)


def adam_second_moment(opt_state: PyTree) -> PyTree:
    """ν, Adam's running average of squared gradients (a PyTree like the params), from an optax
    adam / adamw state. ValueError for optimizers without one (e.g. sgd)."""
    found = [leaf for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(leaf, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"optimizer state has {len(found)} Adam states; second-moment preconditioning needs "
                         "train.optimizer in ['adam', 'adamw']")
    return found[0].nu


# ----------------------------------------------------------------------------------------------
# Checkpoints (safetensors)
# ----------------------------------------------------------------------------------------------

def _named_leaves(prefix: str, tree: PyTree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in leaves}


class TrainingDivergedError(RuntimeError):
    """The training loss or the parameters became non-finite; `.step` is the first bad step."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(message)


def _tensors_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and row-major bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = f"{name}|{array.dtype.str}|{array.shape}\n".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(array.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str, step: int, params: PyTree, opt_state: PyTree) -> None:
    """Writes params and optimizer state leaves to `path` (safetensors) atomically, with the step and
    the tensors' sha256 (`data_sha256`) in the metadata."""
    arrays = {name: np.ascontiguousarray(np.asarray(leaf))
              for name, leaf in {**_named_leaves("params", params), **_named_leaves("opt_state", opt_state)}.items()}
    blob = safetensors.numpy.save(arrays, metadata={"step": str(int(step)), "data_sha256": _tensors_digest(arrays)})
    atomic_write_bytes(path, blob)


def restore_checkpoint(path: str, params_template: PyTree, opt_state_template: PyTree) -> tuple[int, PyTree, PyTree]:
    """(step, params, opt_state) from `path`; the templates fix structure, shapes and dtypes (checked,
    ValueError). `artifacts.CorruptArtifactError` naming the file when it is empty, unreadable or its
    tensors' sha256 differs from the one recorded at save time."""
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            step = int(metadata["step"])
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers / data
        raise artifacts.CorruptArtifactError(path, f"checkpoint {path} is unreadable or corrupt "
                                                   f"({type(error).__name__}: {error})") from None
    recorded = metadata.get("data_sha256")
    if recorded is not None and _tensors_digest(arrays) != recorded:
        raise artifacts.CorruptArtifactError(path, f"checkpoint {path} is corrupt: the sha256 of its tensors "
                                                   "differs from the one recorded when it was written")

    def rebuild(prefix: str, template: PyTree) -> PyTree:
        paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = []
        for key_path, like in paths:
            name = prefix + jax.tree_util.keystr(key_path)
            if name not in arrays:
                raise ValueError(f"checkpoint {path} has no entry {name!r}: it was written for another model/optimizer")
            value = arrays[name]
            if like.shape == () and value.shape == (1,):  # safetensors stores 0-d arrays with shape (1,)
                value = value.reshape(())
            if value.shape != tuple(like.shape) or value.dtype != np.dtype(like.dtype):
                raise ValueError(f"checkpoint entry {name!r} is {value.dtype}{value.shape}, "
                                 f"expected {np.dtype(like.dtype)}{tuple(like.shape)}")
            leaves.append(jnp.asarray(value))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    expected = set(_named_leaves("params", params_template)) | set(_named_leaves("opt_state", opt_state_template))
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"checkpoint {path} has entries the model/optimizer lacks, e.g. {extra[:3]}")
    return step, rebuild("params", params_template), rebuild("opt_state", opt_state_template)


def _check_finite_params(params: PyTree, step: int, when: str) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise TrainingDivergedError(step, f"training diverged: parameter {jax.tree_util.keystr(path)} is "
                                              f"non-finite {when}; no summary is written")


def _restore_newest_good(folder: str, params: PyTree, opt_state: PyTree) -> tuple[int, PyTree, PyTree]:
    """The newest checkpoint in `folder` that reads back intact (step 0 and the given state when there
    is none). A corrupt one is named in a warning and renamed to `<file>.corrupt`; the next older one is
    tried. A checkpoint of another model/optimizer is an error, not a fallback."""
    for step, path in reversed(list_checkpoints(folder)):
        try:
            return restore_checkpoint(path, params, opt_state)
        except artifacts.CorruptArtifactError as error:
            older = [p for s, p in list_checkpoints(folder) if s < step]
            fallback = f"falling back to {older[-1]}" if older else "no older checkpoint: training from step 0"
            warnings.warn(f"{error}; renamed it to {os.path.basename(path)}.corrupt, {fallback}", RuntimeWarning,
                          stacklevel=3)
            os.replace(path, path + ".corrupt")
    return 0, params, opt_state


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] sorted by step."""
    found = []
    for path in glob.glob(os.path.join(folder, "ckpt_*.safetensors")):
        match = _CKPT_RE.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    params: PyTree
    opt_state: PyTree
    step: int
    resumed_from: int          # 0 for a fresh run
    final_loss: float | None   # mean train loss of the last logging window (of the earlier call
                               # read back from metrics.jsonl when a resumed call had no step left)
    eval_metrics: dict         # the last eval_fn result (empty without eval_fn)


def train(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], Any],
    num_steps: int,
    *,
    workdir: Workdir | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    eval_fn: Callable[[PyTree], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    quiet: bool = False,
    description: str = "train",
) -> TrainResult:
    """Minimises `loss_fn` for `num_steps` optimizer steps from `params` (or the newest checkpoint in
    `workdir`). `checkpoint_every` / `eval_every` of 0 disable the periodic ones (a final checkpoint
    is still written when `workdir` is given)."""
    for name, value in (("num_steps", num_steps), ("checkpoint_every", checkpoint_every),
                        ("eval_every", eval_every), ("log_every", log_every), ("keep_checkpoints", keep_checkpoints)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    opt_state = optimizer.init(params)
    start = 0
    ckpt_dir = workdir.file("checkpoints") if workdir is not None else None
    if ckpt_dir is not None:
        start, params, opt_state = _restore_newest_good(ckpt_dir, params, opt_state)
        if start > num_steps:
            raise ValueError(f"workdir has a checkpoint at step {start} > num_steps={num_steps}; use a fresh workdir")
    _check_finite_params(params, start, "at the start" if start == 0 else f"restored at step {start}")
    if workdir is not None:  # records a killed run wrote after its last checkpoint are logged again below
        workdir.drop_records_after(start, ("train/", "eval/"))

    @jax.jit
    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def checkpoint(step: int) -> None:
        _check_finite_params(params, step, f"at step {step}")
        save_checkpoint(os.path.join(ckpt_dir, f"ckpt_{step:08d}.safetensors"), step, params, opt_state)
        for _, old in list_checkpoints(ckpt_dir)[:-keep_checkpoints or None]:
            os.remove(old)

    eval_metrics: dict = {}

    def evaluate(step: int) -> None:
        nonlocal eval_metrics
        eval_metrics = {k: float(v) for k, v in eval_fn(params).items()}
        if workdir is not None:
            workdir.log(step, **{f"eval/{k}": v for k, v in eval_metrics.items()})

    window: list[jax.Array] = []
    final_loss = None
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=description, disable=quiet,
               dynamic_ncols=True)
    for step in bar:
        params, opt_state, loss = update(params, opt_state, batch_at(step))
        window.append(loss)
        done = step + 1
        if log_every and (done % log_every == 0 or done == num_steps):
            losses = np.asarray(jnp.stack(window))
            if not np.all(np.isfinite(losses)):
                first = done - len(losses) + int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
                raise TrainingDivergedError(first, f"training diverged: the train loss is {losses[first - done + len(losses) - 1]} "
                                                   f"at step {first} (of {num_steps}); lower the learning rate or check "
                                                   "the data. No summary is written")
            _check_finite_params(params, done, f"after step {done}")
            final_loss = float(np.mean(losses))
            window = []
            bar.set_postfix(loss=f"{final_loss:.4f}")
            if workdir is not None:
                workdir.log(done, **{"train/loss": final_loss})
        if eval_fn is not None and eval_every and done % eval_every == 0 and done != num_steps:
            evaluate(done)
        if ckpt_dir is not None and checkpoint_every and done % checkpoint_every == 0 and done != num_steps:
            checkpoint(done)
    bar.close()
    if window:  # steps after the last logging step (log_every = 0): still check them
        losses = np.asarray(jnp.stack(window))
        if not np.all(np.isfinite(losses)):
            first = num_steps - len(losses) + int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
            raise TrainingDivergedError(first, f"training diverged: the train loss is non-finite at step {first} "
                                               f"(of {num_steps}). No summary is written")
    _check_finite_params(params, num_steps, f"after step {num_steps}")
    if eval_fn is not None:
        evaluate(num_steps)
    if ckpt_dir is not None and (start < num_steps or not list_checkpoints(ckpt_dir)):
        checkpoint(num_steps)
    if final_loss is None and workdir is not None:  # resumed with no step left: the loss the run logged last
        logged = [r["train/loss"] for r in workdir.read_metrics() if r.get("train/loss") is not None]
        final_loss = float(logged[-1]) if logged else None
    return TrainResult(params=params, opt_state=opt_state, step=num_steps, resumed_from=start,
                       final_loss=final_loss, eval_metrics=eval_metrics)
