"""The layering rule of docs/architecture.md, read from the source's import statements."""
import os

from tools import import_graph


def test_no_upward_or_experiment_to_experiment_import():
    assert import_graph.violations() == []


def test_the_rule_catches_an_experiment_importing_another():
    graph = {"experiments.demo": {"experiments.train_lm", "experiments.common.train"},
             "sketching.base": {"landscape.lanczos"},
             "experiments.common.plots": set(), "experiments.train_lm": set(), "landscape.lanczos": set(),
             "experiments.influence_llm": {"configs.influence_llm", "configs.demo"},
             "attribution.scorers": {"configs.tda_benchmark"}}
    problems = import_graph.violations(graph)
    assert any("experiments.demo imports the experiment experiments.train_lm" in p for p in problems)
    assert any("sketching.base (sketching) imports landscape.lanczos (landscape): an upward import" in p
               for p in problems)
    assert any("attribution.scorers (attribution) imports the config configs.tda_benchmark" in p for p in problems)
    assert not any("configs.demo" in p or "configs.influence_llm" in p for p in problems)  # configs are data
    assert len(problems) == 3


def test_every_experiment_module_is_found_and_parsed():
    modules = import_graph.python_modules()
    kinds = [m for m in modules if import_graph.layer_of(m) == "experiments" and m.count(".") == 1]
    assert "experiments.demo" in kinds and "experiments.run" in kinds
    assert "experiments.common.train" in import_graph.import_graph()["experiments.train_lm"] or \
        "experiments.tasks.planted_lm" in import_graph.import_graph()["experiments.train_lm"]
    assert os.path.exists(os.path.join(import_graph.ROOT, "docs", "architecture.png"))
