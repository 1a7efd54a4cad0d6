"""Simfluence: a linear Markov simulator of per-example test loss over training.

Guu et al. 2023, "Simfluence: Modeling the Influence of Individual Training Examples by Simulating
Training Runs", §3 (Simfluence-Linear). For a test example z and the training batch c_t of step t:

    L_t(z) = α(c_t) · L_{t−1}(z) + β(c_t),     α(c) = 1 + Σ_{i∈c} A_i,   β(c) = Σ_{i∈c} B_i

with one multiplicative (A_i) and one additive (B_i) influence per training example i and test
example z (an example drawn k times in a batch counts k times). `variant="additive"` fixes A = 0
(Simfluence-Additive, the TracIn-like special case of Guu et al. §3.3).

Fitting (Guu et al. §3.4): the one-step residuals are linear in θ = (A, B),

    L_t − L_{t−1} = Σ_i n_{t,i} (A_i L_{t−1} + B_i) = [n_t ⊙ L_{t−1}, n_t] · θ     (n_t: counts of c_t)

so θ is a ridge least-squares fit (`ridge` × ‖θ‖²) over all steps of several observed runs with
random curricula, independently per test example. Evaluation simulates held-out runs from their
true initial loss L_0 using only their curricula and compares the whole predicted trajectory with
the observed one: MSE over all steps and test examples, Spearman of final-step losses across test
examples (Guu et al. report both), and the mean over test examples of Spearman over steps.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from attribution.evaluate import spearman

__all__ = ["VARIANTS", "Simfluence", "batch_counts", "fit_simfluence", "simulate", "evaluate", "spearman"]

VARIANTS = ("linear", "additive")


@dataclasses.dataclass
class Simfluence:
    """Fitted per-example influences: A, B of shape (Q, N) (test examples × training examples)."""

    A: np.ndarray
    B: np.ndarray
    variant: str

    @property
    def num_train(self) -> int:
        return self.B.shape[1]


def batch_counts(curriculum: np.ndarray, num_train: int) -> np.ndarray:
    """(T, b) training indices per step -> (T, N) counts n_{t,i} = #{times i is in batch t}."""
    curriculum = np.asarray(curriculum)
    if curriculum.ndim != 2:
        raise ValueError(f"curriculum must have shape (steps, batch_size), got {curriculum.shape}")
    if curriculum.size and (curriculum.min() < 0 or curriculum.max() >= num_train):
        raise ValueError(f"curriculum indices must lie in [0, num_train={num_train})")
    counts = np.zeros((curriculum.shape[0], num_train))
    np.add.at(counts, (np.repeat(np.arange(curriculum.shape[0]), curriculum.shape[1]), curriculum.reshape(-1)), 1.0)
    return counts


def _check_runs(curricula, losses):
    if len(curricula) != len(losses) or not curricula:
        raise ValueError(f"need the same positive number of curricula and loss trajectories, "
                         f"got {len(curricula)} and {len(losses)}")
    for c, l in zip(curricula, losses):
        if np.asarray(l).shape[0] != np.asarray(c).shape[0] + 1:
            raise ValueError(f"losses must have shape (steps + 1, Q) for a curriculum of {np.asarray(c).shape[0]} "
                             f"steps (row 0 = before training), got {np.asarray(l).shape}")


def fit_simfluence(curricula: Sequence[np.ndarray], losses: Sequence[np.ndarray], num_train: int,
                   variant: str = "linear", ridge: float = 1e-3) -> Simfluence:
    """Least-squares fit of (A, B) from observed runs: `curricula[r]` (T_r, b) training indices and
    `losses[r]` (T_r + 1, Q) test losses before training and after each step."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; allowed values: {list(VARIANTS)}")
    if not ridge > 0:
        raise ValueError(f"ridge={ridge!r}; must be > 0")
    _check_runs(curricula, losses)
    counts = np.concatenate([batch_counts(c, num_train) for c in curricula])                    # (T, N)
    prev = np.concatenate([np.asarray(l, np.float64)[:-1] for l in losses])                      # (T, Q)
    delta = np.concatenate([np.diff(np.asarray(l, np.float64), axis=0) for l in losses])         # (T, Q)
    Q, N = prev.shape[1], num_train
    A, B = np.zeros((Q, N)), np.zeros((Q, N))
    for q in range(Q):
        X = counts if variant == "additive" else np.concatenate([counts * prev[:, q:q + 1], counts], axis=1)
        theta = np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T @ delta[:, q])
        if variant == "additive":
            B[q] = theta
        else:
            A[q], B[q] = theta[:N], theta[N:]
    return Simfluence(A=A, B=B, variant=variant)


def simulate(model: Simfluence, curriculum: np.ndarray, initial_loss: np.ndarray) -> np.ndarray:
    """Rolls the simulator out: (T + 1, Q) predicted losses from L_0 = `initial_loss` (Q,)."""
    counts = batch_counts(curriculum, model.num_train)
    alpha = 1.0 + counts @ model.A.T   # (T, Q)
    beta = counts @ model.B.T
    out = np.empty((counts.shape[0] + 1, model.B.shape[0]))
    out[0] = initial_loss
    for t in range(counts.shape[0]):
        out[t + 1] = alpha[t] * out[t] + beta[t]
    return out


def evaluate(model: Simfluence, curricula: Sequence[np.ndarray], losses: Sequence[np.ndarray]) -> dict:
    """On held-out runs: `mse` (all steps ≥ 1, all test examples), `spearman_final` (mean over runs of
    Spearman across test examples of the final loss) and `spearman_steps` (mean over runs and test
    examples of Spearman over steps), plus the predictions."""
    _check_runs(curricula, losses)
    preds, sq, sf, ss = [], [], [], []
    for c, l in zip(curricula, losses):
        l = np.asarray(l, np.float64)
        p = simulate(model, c, l[0])
        preds.append(p)
        sq.append(np.mean((p[1:] - l[1:]) ** 2))
        sf.append(spearman(p[-1], l[-1]))
        ss.extend(spearman(p[:, q], l[:, q]) for q in range(l.shape[1]))
    return {"mse": float(np.mean(sq)), "spearman_final": float(np.nanmean(sf)),
            "spearman_steps": float(np.nanmean(ss)), "predictions": preds}
