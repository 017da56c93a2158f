"""Sweeps: one method parameter (λ, k, ...) over a list of values -> accuracy curves.

Pure library code: the app's Sweep page, benchmarks and the CLI all call `sweep` /
`sweep_methods`. Progress goes through an optional `progress(fraction, message)` callback, so a
caller can draw a progress bar without this module knowing how.

A method without the swept parameter (e.g. weight averaging has no λ) is evaluated once and
drawn as a flat reference line (`varies=False`), so methods can share one axis.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

Progress = Callable[[float, str], None]


@dataclass
class SweepResult:
    """Accuracy of one method at each value of one parameter.

    Units as engine.evaluate.AccuracyReport: accuracies in percent, normalised averages as ratios
    (1.0 = as good as the experts).
    """

    method: str
    label: str
    param: str
    values: list[float]
    config: dict[str, Any]            # the other hyperparameters, held fixed
    tasks: list[str]
    per_task: dict[str, list[float]]  # task -> accuracy (%) at each value
    average: list[float]
    normalized_average: list[float]
    varies: bool = True               # False: the method has no such parameter (flat line)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def best(self) -> tuple[float, float]:
        """(value, average accuracy) of the best point."""
        i = max(range(len(self.values)), key=lambda j: self.average[j])
        return self.values[i], self.average[i]


def _config_fields(method: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(method.Config)}


def make_config(method: Any, overrides: Mapping[str, Any] | None = None) -> Any:
    """Build `method.Config` from a dict, ignoring keys the method does not have."""
    names = _config_fields(method)
    return method.Config(**{k: v for k, v in (overrides or {}).items() if k in names})


def sweep(
    stack: Any,
    method: Any,
    param: str,
    values: Sequence[float],
    *,
    evaluate_fn: Callable[[dict], Any],
    config: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Merge `stack` with `method` at each value of `param` and evaluate each merged model.

    `method` is a registry entry (engine.methods.get_method(name)); `evaluate_fn(state_dict)`
    returns an AccuracyReport (per_task, average, normalized_average), e.g.
    `lambda sd: evaluate(zoo, sd, tasks=stack.tasks)`.
    """
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("a sweep needs at least one value")
    varies = param in _config_fields(method)
    fixed = {k: v for k, v in (config or {}).items() if k in _config_fields(method) and k != param}
    per_task: dict[str, list[float]] = {t: [] for t in stack.tasks}
    average: list[float] = []
    normalized_average: list[float] = []

    points = values if varies else values[:1]
    for i, value in enumerate(points):
        if progress:
            progress(i / len(points), f"{method.label}: {param} = {value:g} ({i + 1}/{len(points)})")
        cfg = make_config(method, {**fixed, param: value} if varies else fixed)
        report = evaluate_fn(stack.apply(method.merge(stack, cfg)))
        for t in stack.tasks:
            per_task[t].append(float(report.per_task[t]))
        average.append(float(report.average))
        normalized_average.append(float(report.normalized_average))
    if not varies:  # a flat line across the whole axis
        per_task = {t: v * len(values) for t, v in per_task.items()}
        average, normalized_average = average * len(values), normalized_average * len(values)
    if progress:
        progress(1.0, f"{method.label}: done")
    return SweepResult(method=method.name, label=method.label, param=param, values=values,
                       config=fixed, tasks=list(stack.tasks), per_task=per_task, average=average,
                       normalized_average=normalized_average, varies=varies)


def sweep_methods(
    stack: Any,
    methods: Sequence[Any],
    param: str,
    values: Sequence[float],
    *,
    evaluate_fn: Callable[[dict], Any],
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
) -> list[SweepResult]:
    """`sweep` for several methods on the same values; progress covers the whole job."""
    methods = list(methods)
    cost = [len(values) if param in _config_fields(m) else 1 for m in methods]
    total, done = sum(cost) or 1, 0
    results = []
    for m, c in zip(methods, cost):
        def sub(fraction: float, message: str, _done=done, _c=c) -> None:
            if progress:
                progress(min(1.0, (_done + fraction * _c) / total), message)

        results.append(sweep(stack, m, param, values, evaluate_fn=evaluate_fn,
                             config=(configs or {}).get(m.name), progress=sub))
        done += c
    if progress:
        progress(1.0, "sweep done")
    return results
