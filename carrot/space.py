"""Search spaces as objects.

Each variant declares ``search_space`` as a mapping from hyperparameter name to one of
these distributions; the study turns them into Optuna suggestions without knowing any
variant by name.

>>> space = {"lam": Float(0.01, 1.0, log=True), "mode": Categorical(["kl", "supcon"])}
>>> sorted(space)
['lam', 'mode']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the training path runs without Optuna installed
    import optuna


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: "optuna.Trial", name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= float(value) <= self.high


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def suggest(self, trial: "optuna.Trial", name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Categorical:
    choices: Sequence[Any]

    def suggest(self, trial: "optuna.Trial", name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def contains(self, value: Any) -> bool:
        return value in list(self.choices)


Distribution = Float | Int | Categorical


def suggest_all(trial: "optuna.Trial", space: dict[str, Distribution], prefix: str = "") -> dict[str, Any]:
    """Draw every hyperparameter of ``space`` from ``trial`` (names get ``prefix``)."""
    return {name: dist.suggest(trial, prefix + name) for name, dist in space.items()}
