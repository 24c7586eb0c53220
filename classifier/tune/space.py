"""The search space of an experiment YAML (`search.space`) as Optuna distributions, checked before any trial runs."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from classifier.errors import UserError

DISTRIBUTIONS = ("float", "int", "categorical")


def parse_space(
    space: dict[str, Any], known: Iterable[str], origin: str = "search.space"
) -> dict[str, BaseDistribution]:
    """Turn `{name: {type: float|int|categorical, ...}}` into Optuna distributions over known training options."""
    known = sorted(known)
    distributions = {}
    for name, spec in space.items():
        where = f"{origin}.{name}"
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"tunable options: {', '.join(known)}"
            raise UserError(f"{where}: unknown parameter (not a training option); {hint}")
        distributions[name] = _distribution(spec, where)
    return distributions


def _distribution(spec: Any, where: str) -> BaseDistribution:
    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError(f"{where}: expected a mapping with 'type: float|int|categorical' and its bounds or choices")
    kind = spec["type"]
    allowed = {
        "float": {"low", "high", "log", "step"},
        "int": {"low", "high", "log", "step"},
        "categorical": {"choices"},
    }
    if kind not in allowed:
        raise UserError(f"{where}: unknown distribution '{kind}'; use one of {', '.join(DISTRIBUTIONS)}")
    extra = set(spec) - allowed[kind] - {"type"}
    if extra:
        raise UserError(f"{where}: unexpected key(s) {', '.join(sorted(extra))} for a {kind} distribution")
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}: 'choices' must be a non-empty list")
            return CategoricalDistribution(choices)
        number = float if kind == "float" else int
        low, high = number(spec["low"]), number(spec["high"])
        step = None if spec.get("step") is None else number(spec["step"])
        if low > high:
            raise UserError(f"{where}: low ({low}) is greater than high ({high}); swap them")
        if kind == "float":
            return FloatDistribution(low, high, log=bool(spec.get("log", False)), step=step)
        return IntDistribution(low, high, log=bool(spec.get("log", False)), step=step or 1)
    except KeyError as error:
        raise UserError(f"{where}: missing '{error.args[0]}' for a {kind} distribution") from error
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {error}") from error


def suggest(trial: optuna.Trial, distributions: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Ask `trial` for one value of each parameter."""
    values = {}
    for name, distribution in distributions.items():
        if isinstance(distribution, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, distribution.choices)
        elif isinstance(distribution, IntDistribution):
            values[name] = trial.suggest_int(
                name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
            )
        else:
            values[name] = trial.suggest_float(
                name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
            )
    return values


def read_enqueued(path: Path, distributions: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """The known-good configurations in `path` (a YAML list of `{parameter: value}`), each checked against the space:
    they become the study's first trials."""
    try:
        trials = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(
            f"--enqueue {path}: cannot read it ({type(error).__name__}); pass a YAML list of mappings"
        ) from None
    if not isinstance(trials, list) or not all(isinstance(trial, dict) and trial for trial in trials):
        raise UserError(f"--enqueue {path}: expected a YAML list of {{parameter: value}} mappings, one per trial")
    for number, trial in enumerate(trials, start=1):
        for name, value in trial.items():
            where = f"--enqueue {path}: trial {number}"
            if name not in distributions:
                raise UserError(
                    f"{where} sets '{name}', which the search space does not tune; tuned: "
                    f"{', '.join(sorted(distributions))}"
                )
            distribution = distributions[name]
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (TypeError, ValueError):
                inside = False
            if not inside:
                raise UserError(f"{where}: {name}={value!r} lies outside the search space ({distribution})")
    return trials
