"""Models by name, so that every peer of a job builds the same architecture from the signed
job description (weights travel as flat float32 vectors, never pickled).

``build("mlp", inputs=64, hidden=[128], classes=10)``; apps add their own with
``@register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["build", "names", "register"]

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``factory(**kwargs) -> nn.Module`` buildable as ``name``."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    """Every registered model name."""
    return sorted(_REGISTRY)


def build(name: str, **kwargs: Any) -> nn.Module:
    """A fresh model ``name`` built with ``kwargs``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no model {name!r}; known: {', '.join(names())}") from None
    return factory(**kwargs)


@register("mlp")
def mlp(inputs: int = 64, hidden: Sequence[int] = (128,), classes: int = 10) -> nn.Module:
    """A multilayer perceptron with ReLU between layers (digits: 64 -> 128 -> 10, 9.6k
    parameters)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@register("cnn")
def cnn(channels: int = 1, side: int = 8, classes: int = 10, width: int = 16) -> nn.Module:
    """A small CNN: two 3x3 convolutions with ReLU, a 2x2 max-pool, a linear head (digits:
    1x8x8 images)."""
    pooled = side // 2
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * pooled * pooled, classes),
    )
