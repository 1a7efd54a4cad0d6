"""The paper's sketch tables side by side: the paper's number / ours with the paper's map / ours with
our variant (experiments/paper_tables.py), written to report.md.

    python -m experiments.run --config configs/paper_tables.py:quick --workdir runs/paper_tables_quick
Presets: default (every table at the largest scale that fits about an hour on 2 CPU cores), quick
(every table, smaller grids); their times are in PRESETS below.
"""
import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "every table on full grids: tiny LM + MiniLM's last two layers, 2^12 pairs, m up to 2^16 (≈ 51 min)",
    "quick": "every table on small grids: tiny LM, MiniLM's last feed-forward layer, small timing grids (≈ 8 min)",
}


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {[p for p in PRESETS if p]} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "paper_tables"
    config.seed = 0
    config.quiet = False
    config.sections = ("table6", "table7", "cost", "table11", "layers", "tda_cost")
    config.maps = ("fjl", "ffd", "affd", "afjl", "qk")
    config.tiny_lm = ml_collections.ConfigDict(dict(
        preset="", train_steps=300, num_queries=64, num_train=64, hessian_examples=64))
    # MiniLM's gradients are taken w.r.t. the parameters whose path contains one of these strings
    # (empty: all 22.7M, which needs ≈ 90 MB per example on the CPU).
    config.minilm = ml_collections.ConfigDict(dict(
        enabled=True, train_steps=16, num_queries=64, num_train=64, max_len=20,
        gradient_params=("layer']['4']", "layer']['5']", "classifier", "head")))
    # each map's search stops at the first m reaching r ≥ 0.99 (a larger m cannot change the table)
    config.table6 = ml_collections.ConfigDict(dict(log2_ms=tuple(range(7, 17)), seeds=3, models=("tiny_lm", "minilm")))
    config.table7 = ml_collections.ConfigDict(dict(log2_ms=(6, 7, 8, 9, 10, 11, 12), num_iters=64,
                                                   maps=("affd", "afjl", "qk")))
    config.cost = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(num_layers=6, d_model=384, num_heads=6, vocab_size=16384, max_len=64)),
        batch_size=4, log2_m=16, hvp=True, repeats=3, algos=("fjl", "ffd", "affd", "afjl", "qk")))
    # a map slower than max_call_s per call (the dense projector) is not timed at larger m
    config.table11 = ml_collections.ConfigDict(dict(log2_d=18, log2_ms=(12, 13, 14, 15, 16, 17, 18), repeats=3,
                                                    max_call_s=30.0))
    config.layers = ml_collections.ConfigDict(dict(models=("tiny_lm", "minilm"), whole_model_log2_m=13, num_iters=40))
    # explicit mode at every sequence length in max_lens, implicit at the shortest one only (an implicit
    # per-example sketch of all of MiniLM costs 50-100x the plain per-example gradient on this CPU)
    config.tda_cost = ml_collections.ConfigDict(dict(log2_ms=(12, 16), implicit_log2_ms=(12,),
                                                     max_lens=(16, 128, 512), maps=("affd", "afjl", "qk"),
                                                     batch_size=2, repeats=3))
    if arg == "quick":
        config.tiny_lm.update(train_steps=100, num_queries=32, num_train=32, hessian_examples=32)
        # the last block's feed-forward output layer and the head: D = 0.59M (the whole last block: 1.78M)
        config.minilm.update(train_steps=4, num_queries=32, num_train=32, max_len=16,
                             gradient_params=("layer']['5']['output", "classifier", "head"))
        config.table6.update(log2_ms=(6, 9, 12), seeds=3)
        config.table7.update(log2_ms=(7, 10), num_iters=30)
        config.cost.model.update(num_layers=2, d_model=128, num_heads=4, vocab_size=4096, max_len=32)
        config.cost.update(batch_size=2, log2_m=12, repeats=2)
        config.table11.update(log2_d=17, log2_ms=(10, 12, 14), repeats=2)
        config.layers.update(models=("tiny_lm",), num_iters=20, whole_model_log2_m=13)
        # batch 4 at m = 2^16 reached 12 GB RSS (implicit mode) on a shared 24 GB machine and was OOM-killed.
        config.tda_cost.update(log2_ms=(12,), implicit_log2_ms=(12,), max_lens=(16, 512), maps=("afjl",),
                               batch_size=2, repeats=2)
    return config
