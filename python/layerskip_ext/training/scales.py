"""Scale functions and curricula shared by layer dropout and the early-exit loss.

Layer dropout (paper Eq. 1-2): the rate of layer ``l`` (0-based, of ``L``) at step ``t`` (of ``T``) is
``p_max * S(l) * D(t)``. ``S`` and ``D`` are functions of a position ``x`` in ``[0, 1]`` (``x = l / (L - 1)``,
``x = t / (T - 1)``) that rise from about 0 to 1:

    uniform      1
    linear       x
    exponential  e^(x ln 2) - 1       (the paper's S(l) = e^(l ln2 / (L-1)) - 1, and its rising D(t))
    log          ln(1 + x (n - 1)) / ln(n)   (n = L for layers, T for time: log base n of l + 1)
    sigmoid      logistic(10 (x - 1/2)), rescaled to exactly 0 at x = 0 and 1 at x = 1
    step         0 below x = 1/2, 1 from there on
    sine         sin(pi x / 2)

``D`` also accepts ``none`` (constant 1: no time curriculum).

Early-exit loss weights (paper Sec. 4.2): a layer's raw weight is a function of its 1-based number ``E``:
``sum-l`` (1 + 2 + ... + E), ``linear-l`` (E), ``uniform`` (1), ``sqrt-l`` (sqrt E), ``inv-l`` (1 / E),
``inv-sqrt-l`` (1 / sqrt E).
"""
from __future__ import annotations

import math

from ..errors import TrainingError

_ALIASES = {"exp": "exponential", "lin": "linear", "sin": "sine", "one": "uniform", "constant": "uniform",
            "sum_l": "sum-l", "linear_l": "linear-l", "l": "linear-l", "sqrt_l": "sqrt-l", "inv_l": "inv-l",
            "inv_sqrt_l": "inv-sqrt-l"}

LAYER_SCALES = ("uniform", "linear", "exponential", "log", "sigmoid", "step", "sine")
TIME_CURRICULA = ("none",) + LAYER_SCALES
EXIT_LOSS_SCALES = ("sum-l", "linear-l", "uniform", "sqrt-l", "inv-l", "inv-sqrt-l")
EXIT_CURRICULA = ("none", "rotational", "gradual")


def canonical(name: str, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(name, str):
        raise TrainingError(f"{what} must be a name, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in choices:
        raise TrainingError(f"unknown {what} {name!r}; choose one of {', '.join(choices)}")
    return key


def _rising(name: str, x: float, n: int) -> float:
    x = min(max(float(x), 0.0), 1.0)
    if name == "uniform":
        return 1.0
    if name == "linear":
        return x
    if name == "exponential":
        return math.exp(x * math.log(2.0)) - 1.0
    if name == "log":
        return math.log1p(x * (n - 1)) / math.log(n) if n > 1 else 1.0
    if name == "sigmoid":
        s = lambda v: 1.0 / (1.0 + math.exp(-10.0 * (v - 0.5)))  # noqa: E731
        return (s(x) - s(0.0)) / (s(1.0) - s(0.0))
    if name == "step":
        return 0.0 if x < 0.5 else 1.0
    if name == "sine":
        return math.sin(0.5 * math.pi * x)
    raise AssertionError(name)


def layer_scale(name: str, layer: int, num_layers: int) -> float:
    """S(l) for 0-based layer ``layer`` of ``num_layers`` (a single layer counts as the last one)."""
    name = canonical(name, LAYER_SCALES, "layer-dropout scale")
    x = layer / (num_layers - 1) if num_layers > 1 else 1.0
    return _rising(name, x, num_layers)


def time_scale(name: str, step: int, total_steps: int | None) -> float:
    """D(t) for 0-based step ``step`` of ``total_steps`` (1 when there is no curriculum or no horizon)."""
    name = canonical(name, TIME_CURRICULA, "layer-dropout time curriculum")
    if name == "none" or not total_steps:
        return 1.0
    x = step / (total_steps - 1) if total_steps > 1 else 1.0
    return _rising(name, x, total_steps)


def exit_scale(name: str, layer_number: int) -> float:
    """Raw early-exit loss weight of the exit after layer ``layer_number`` (1-based)."""
    name = canonical(name, EXIT_LOSS_SCALES, "early-exit loss scale")
    e = float(layer_number)
    return {"sum-l": e * (e + 1) / 2, "linear-l": e, "uniform": 1.0, "sqrt-l": math.sqrt(e),
            "inv-l": 1.0 / e, "inv-sqrt-l": 1.0 / math.sqrt(e)}[name]
