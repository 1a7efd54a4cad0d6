"""Cached, resumable retraining: the ground truth of LDS, leave-one-out and brittleness.

Counterfactual evaluations of attribution retrain the model on many training
subsets S_r ⊂ {1..N}, given as indicator rows `masks[r]` ∈ {0, 1}^N, and record an outcome vector per
run (e.g. the query losses f_q(θ_{S_r}) and margins). Retraining dominates the cost, so every outcome is
stored on disk as soon as it exists:

    <path>/manifest.json           fingerprint of the experiment + sha256 of the masks (strict JSON)
    <path>/run-000017.npz          outcome of run 17 (float64), with the run number, the sha256 of its
                                   mask row and the manifest's digest; atomic write, no pickle

`retrain_outcomes` computes only the runs whose file is missing (a killed evaluation resumes where it
stopped; a finished one is free to rerun) and refuses a folder built for other masks or another
fingerprint (model, data, optimiser, seed), naming the fields that differ (the `artifacts`
fingerprint rule; the fingerprint must be JSON data: arrays are stored in full, never as a
truncated `str`). A run file is reused only if it reads back whole (zip CRC-32 of every member) and
names this run, this mask and this manifest; an empty, corrupt or foreign run file is named in a
warning and retrained.

Subset generators (Park et al. 2023 §2.2; Koh & Liang 2017; Ilyas et al. 2022 "brittleness"):
- `random_subset_masks`: R subsets of exactly round(αN) examples (α = 0.5 by default),
- `leave_one_out_masks`: one run per left-out example,
- `top_k_removal_masks`: for each query and k, the training set minus its k highest-scored examples.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from typing import Callable, Mapping, Sequence

import numpy as np

import artifacts

__all__ = ["RetrainMismatchError", "random_subset_masks", "leave_one_out_masks", "top_k_removal_masks",
           "retrain_outcomes"]


class RetrainMismatchError(artifacts.FingerprintMismatchError):
    """The retraining folder was built for other masks or another experiment fingerprint; `.fields`
    maps each differing field (e.g. "fingerprint.model", "masks_sha256") to (on disk, requested)."""


def random_subset_masks(num_examples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(R, N) float masks; row r keeps exactly round(fraction·N) examples drawn without replacement."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if num_subsets < 1 or num_examples < 2:
        raise ValueError(f"need num_subsets >= 1 and num_examples >= 2, got {num_subsets}, {num_examples}")
    keep = max(1, int(round(fraction * num_examples)))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_examples))
    for r in range(num_subsets):
        masks[r, rng.choice(num_examples, size=keep, replace=False)] = 1.0
    return masks


def leave_one_out_masks(num_examples: int, left_out: Sequence[int]) -> np.ndarray:
    """(len(left_out), N): row i is all ones except a zero at left_out[i]."""
    left_out = np.asarray(left_out, dtype=int)
    if left_out.size and (left_out.min() < 0 or left_out.max() >= num_examples):
        raise ValueError(f"left_out indices must be in 0..{num_examples - 1}")
    masks = np.ones((len(left_out), num_examples))
    masks[np.arange(len(left_out)), left_out] = 0.0
    return masks


def top_k_removal_masks(scores: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(Q·len(ks), N) masks, query-major: for query q and k in ks, all ones except the k training
    examples with the highest scores[q] (the most helpful ones under our sign convention)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (Q, N), got shape {scores.shape}")
    if any(k < 1 or k >= scores.shape[1] for k in ks):
        raise ValueError(f"every k must be in 1..{scores.shape[1] - 1}, got {list(ks)}")
    order = np.argsort(-scores, axis=1, kind="stable")
    masks = np.ones((scores.shape[0] * len(ks), scores.shape[1]))
    for q in range(scores.shape[0]):
        for i, k in enumerate(ks):
            masks[q * len(ks) + i, order[q, :k]] = 0.0
    return masks


def _masks_digest(masks: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(masks, dtype=np.float64).tobytes()).hexdigest()


def _run_file(path: str, r: int) -> str:
    return os.path.join(path, f"run-{r:06d}.npz")


def _check_manifest(path: str, manifest: dict) -> None:
    file = os.path.join(path, "manifest.json")
    if os.path.exists(file):
        old = artifacts.read_json(file)
        differ = artifacts.diff_fields(old, manifest)
        if differ:
            raise RetrainMismatchError(os.path.abspath(path), differ, "retraining folder",
                                       "use another folder, or delete it to retrain")
    else:
        artifacts.atomic_write_json(file, manifest)


def _read_run(file: str, r: int, mask_sha256: str, manifest_digest: str) -> tuple[np.ndarray | None, str]:
    """(outcome, "") for a whole run file of this run / mask / manifest, else (None, why not)."""
    if not os.path.exists(file):
        return None, ""
    if os.path.getsize(file) == 0:
        return None, "empty (0 bytes)"
    try:
        with np.load(file, allow_pickle=False) as z:
            record = {k: np.asarray(z[k]) for k in ("outcome", "run", "mask_sha256", "manifest")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        return None, f"unreadable or corrupt ({type(error).__name__}: {error})"
    if int(record["run"]) != r or str(record["mask_sha256"]) != mask_sha256 or str(record["manifest"]) != manifest_digest:
        return None, "written for another run, mask or manifest"
    return record["outcome"], ""


def retrain_outcomes(path: str, masks: np.ndarray, train_and_evaluate: Callable[[np.ndarray], np.ndarray], *,
                     fingerprint: Mapping, chunk_size: int = 16, progress: bool = False,
                     description: str = "retraining") -> np.ndarray:
    """Outcomes (R, ...) of retraining on every row of `masks` (R, N), cached under `path`.

    `train_and_evaluate(mask_chunk (c, N)) -> (c, ...)` trains c models (e.g. vmapped) and returns their
    outcomes; it is called only on the runs missing on disk, `chunk_size` at a time. `fingerprint` (JSON
    data) identifies everything else the outcome depends on; together with the masks' sha256 it must
    match a folder's manifest, else RetrainMismatchError.
    """
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim != 2 or not np.isin(masks, (0.0, 1.0)).all():
        raise ValueError(f"masks must be a (R, N) array of 0/1, got shape {masks.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    os.makedirs(path, exist_ok=True)
    manifest = {"fingerprint": artifacts.normalise(dict(fingerprint)), "format": 2,
                "masks_sha256": _masks_digest(masks), "num_runs": int(masks.shape[0]),
                "num_examples": int(masks.shape[1])}
    _check_manifest(path, manifest)
    manifest_digest = artifacts.digest(manifest)
    row_digests = [_masks_digest(row[None]) for row in masks]
    outcomes_on_disk: dict[int, np.ndarray] = {}
    bad = []
    for r in range(len(masks)):
        outcome, why = _read_run(_run_file(path, r), r, row_digests[r], manifest_digest)
        if outcome is not None:
            outcomes_on_disk[r] = outcome
        elif why:
            bad.append(f"{os.path.basename(_run_file(path, r))}: {why}")
    if bad:
        warnings.warn(f"retraining folder {os.path.abspath(path)}: retraining {len(bad)} run(s) whose files cannot "
                      f"be reused: {'; '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}", RuntimeWarning, stacklevel=2)
    missing = [r for r in range(len(masks)) if r not in outcomes_on_disk]
    chunks = [missing[i:i + chunk_size] for i in range(0, len(missing), chunk_size)]
    if chunks:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=description, disable=not progress, leave=False)
        for chunk in chunks:
            outcomes = np.asarray(train_and_evaluate(masks[chunk]))
            if outcomes.shape[0] != len(chunk):
                raise ValueError(f"train_and_evaluate returned {outcomes.shape[0]} outcomes for {len(chunk)} masks")
            for r, outcome in zip(chunk, outcomes):
                outcome = np.asarray(outcome, dtype=np.float64)
                artifacts.atomic_write_npz(_run_file(path, r), {
                    "outcome": outcome, "run": np.int64(r), "mask_sha256": np.array(row_digests[r]),
                    "manifest": np.array(manifest_digest)})
                outcomes_on_disk[r] = outcome
            bar.update(len(chunk))
        bar.close()
    return np.stack([outcomes_on_disk[r] for r in range(len(masks))])
