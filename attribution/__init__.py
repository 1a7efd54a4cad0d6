"""Training-data attribution: the gradient index (attribution.index) and scorers (attribution.scorers)."""
from attribution.index import (GradientIndex, IndexIncompleteError, IndexMismatchError, build_index,
                               params_hash, sketched_features_fn, top_k)
from attribution.decompose import layer_groups, per_layer_scores, per_token_gradients, per_token_scores
from attribution.evaluate import lds, loo_correlation, mean_reciprocal_rank, recall_at_k, spearman
from attribution.scorers import (SCORERS, arnoldi_influence_scores, cosine_scores, dot_scores, influence_scores,
                                 inverse_hvp, trak_scores, tracin_scores, unit_scores)
