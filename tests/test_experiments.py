"""Every shipped experiment YAML is a valid config for each command it has a section for."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from classifier.config import PrepareConfig, SearchConfig, TrainConfig, build_config, load_section
from classifier.tune.space import parse_space

SECTIONS = {"prepare": PrepareConfig, "train": TrainConfig, "search": SearchConfig}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda path: path.stem)
def test_experiment_configs_are_valid(path: Path) -> None:
    for section, cls in SECTIONS.items():
        build_config(cls, load_section(path, section), origin=str(path))
    search = build_config(SearchConfig, load_section(path, "search"), origin=str(path))
    distributions = parse_space(search.space, [name for name in TrainConfig.__dataclass_fields__])
    train = load_section(path, "train")
    for name, distribution in distributions.items():  # every choice of the space is a valid training option
        for choice in getattr(distribution, "choices", []):
            build_config(TrainConfig, train, {name: choice}, origin=f"{path} search.space.{name}")
