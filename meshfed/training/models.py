"""Models by name, so that every peer of a job builds the same architecture from the signed
job description (weights travel as flat float32 vectors, never pickled).

``build("mlp", inputs=64, hidden=[128], classes=10)``; built in: ``mlp``, ``cnn``,
``cifar_cnn``, ``resnet`` (GroupNorm), ``mobilenet`` (depthwise-separable); apps add their own
with ``@register("name")``. Input is always a batch of flat feature rows; image models reshape
it to ``(channels, side, side)`` themselves.
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


@register("cifar_cnn")
def cifar_cnn(channels: int = 3, side: int = 32, classes: int = 10, width: int = 32) -> nn.Module:
    """The CIFAR-style CNN of the FedAvg paper: two 5x5 conv + max-pool blocks, two dense
    layers."""
    quarter = side // 4
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * quarter * quarter, 256),
        nn.ReLU(),
        nn.Linear(256, classes),
    )


class _Residual(nn.Module):
    """Two 3x3 convolutions with a skip connection (GroupNorm: batch statistics do not average
    well across non-IID peers)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(min(8, width), width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(min(8, width), width),
        )

    def forward(self, x: Any) -> Any:
        return nn.functional.relu(x + self.body(x))


@register("resnet")
def resnet(
    channels: int = 1, side: int = 8, classes: int = 10, width: int = 16, blocks: int = 2
) -> nn.Module:
    """A small ResNet: a stem convolution, ``blocks`` residual blocks, global average pooling."""
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, width, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, width), width),
        nn.ReLU(),
        *[_Residual(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


@register("mobilenet")
def mobilenet(
    channels: int = 1, side: int = 8, classes: int = 10, widths: Sequence[int] = (16, 32, 64)
) -> nn.Module:
    """A MobileNet-like net: depthwise-separable convolutions (3x3 depthwise, 1x1 pointwise),
    stride 2 after the first block, global average pooling."""
    layers: list[nn.Module] = [
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, widths[0], 3, padding=1),
        nn.ReLU(),
    ]
    previous = widths[0]
    for index, width in enumerate(widths):
        stride = 2 if index == 1 else 1
        layers += [
            nn.Conv2d(previous, previous, 3, stride=stride, padding=1, groups=previous),
            nn.ReLU(),
            nn.Conv2d(previous, width, 1),
            nn.ReLU(),
        ]
        previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, classes)]
    return nn.Sequential(*layers)
