"""The reusable stack the experiments share: workdir files, models, data, tokenizers, training, timing, plots, config checks."""
