"""Models by name, so that every peer of a job builds the same architecture from the signed
job description (weights travel as flat float32 vectors, never pickled).

``build("mlp", inputs=64, hidden=[128], classes=10)``; built in: ``mlp``, ``cnn``,
``cifar_cnn``, ``resnet`` (GroupNorm), ``mobilenet`` (depthwise-separable); apps add their own
with ``@register("name")``. Input is always a batch of flat feature rows; image models reshape
it to ``(channels, side, side)`` themselves.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["build", "check_fits", "names", "register"]

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
        ValueError: an option the model does not take (with the closest one it does).
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no model {name!r}; known: {', '.join(names())}") from None
    options = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    for key in kwargs:
        if key not in options and not takes_any:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(options)}"
            raise ValueError(f"model {name!r} has no option {key!r}; {hint}")
    return factory(**kwargs)


def check_fits(model: nn.Module, rows: npt.NDArray[np.float32], classes: int) -> None:
    """Run ``model`` on ``rows`` (a batch of the data set's feature rows) and check that it
    gives a score for each of ``classes`` classes for each row; the model's mode and weights
    are left as they were (evaluation mode: no batch statistics move).

    Raises:
        ValueError: the model cannot take rows of this width, or gives the wrong shape.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = model(torch.from_numpy(np.ascontiguousarray(rows)))
    except Exception as exc:  # whatever torch says about the shapes
        raise ValueError(
            f"it cannot take rows of {rows.shape[1]} features ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        model.train(was_training)
    if not (
        isinstance(scores, torch.Tensor)
        and scores.ndim == 2
        and scores.shape[0] == len(rows)
        and scores.shape[1] >= classes
    ):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
        raise ValueError(
            f"it gives scores of shape {shape} for {len(rows)} rows, where the data set "
            f"needs ({len(rows)}, {classes}): a score for each of its classes (option classes)"
        )


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
