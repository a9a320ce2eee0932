"""Model factories usable as Hydra ``_target_``s.

Weights are downloaded only when asked for by name (``torchvision_model(..., weights=...)``), and
then from the torch hub cache first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


class SmallCNN(nn.Module):
    """A small CNN for the 8x8 digits resized to ``image_size``.

    Layout (names matter: callbacks select layers by them)::

        features.conv1  3x3, in_channels -> widths[0]   + bn1, relu1
        features.conv2  3x3, widths[0] -> widths[1]     + bn2, relu2, pool2 (2x2)
        features.conv3  3x3, widths[1] -> widths[2]     + bn3, relu3, pool3 (2x2)
        classifier.fc1  widths[2] * (image_size/4)^2 -> hidden, relu1
        classifier.fc2  hidden -> hidden, relu2         (the square "hidden layer")
        classifier.fc3  hidden -> num_classes

    Args:
        num_classes: output logits.
        in_channels: input channels (1 for grey digits).
        image_size: input side in pixels, divisible by 4.
        widths: output channels of conv1..conv3.
        hidden: width of the two hidden fully connected layers.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 16,
        widths: Sequence[int] = (32, 64, 64),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallCNN: image_size must be divisible by 4, got {image_size}")
        if len(widths) != 3:
            raise ValueError(f"SmallCNN: widths must have 3 entries, got {list(widths)}")
        c1, c2, c3 = (int(w) for w in widths)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(c1),
                relu1=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(c1, c2, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(c2),
                relu2=nn.ReLU(inplace=True),
                pool2=nn.MaxPool2d(2),
                conv3=nn.Conv2d(c2, c3, 3, padding=1, bias=False),
                bn3=nn.BatchNorm2d(c3),
                relu3=nn.ReLU(inplace=True),
                pool3=nn.MaxPool2d(2),
            )
        )
        flat = c3 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(flat, hidden),
                relu1=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(inplace=True),
                fc3=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.classifier(self.features(x).flatten(1))


def digits_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 16,
    widths: Sequence[int] = (32, 64, 64),
    hidden: int = 256,
) -> SmallCNN:
    """The :class:`SmallCNN` used by the digits quickstart."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, widths=widths, hidden=hidden)


def _head_path(model: nn.Module) -> str:
    """The attribute path of a torchvision classifier's last ``Linear`` (``fc``, ``classifier.6``, ``heads.head``)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head to replace")
    return last


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Replace the last ``Linear`` of ``model`` by a fresh one with ``num_classes`` outputs; returns its name."""
    from lightning_struct.nn.utils import set_submodule

    name = _head_path(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)
    set_submodule(model, name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


def hub_cache_file(weights: object) -> str:
    """Where torch hub keeps (and first looks for) the file of a torchvision weights entry."""
    import os

    import torch

    url = weights.url  # type: ignore[attr-defined]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def torchvision_model(name: str, num_classes: int = 1000, weights: str | None = None, **kwargs: object) -> nn.Module:
    """Any ``torchvision.models`` builder by name, randomly initialised or from pretrained ``weights``.

    Args:
        name: a ``torchvision.models.list_models()`` name (``resnet50``, ``alexnet``, ``vit_b_16``...).
        num_classes: logits. With ``weights`` trained for another number of classes (ImageNet's
            1000), the classifier head (the last ``Linear``) is replaced by a freshly initialised
            one: the backbone is pretrained, the head is learnt on your classes.
        weights: a weights name of that model (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``,
            ``"DEFAULT"``; the enum form ``"ResNet50_Weights.IMAGENET1K_V2"`` too) or ``None``.
            torchvision loads the file from the torch hub cache (``$TORCH_HOME/hub/checkpoints``)
            when it is there and downloads it otherwise; without a network and without the file
            the error says which file to put where.
        **kwargs: other builder arguments (``dropout``...).

    Raises ``ValueError`` listing close names when ``name`` or ``weights`` is unknown.
    """
    import difflib

    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(f"unknown torchvision model {name!r}; did you mean one of {close}?")
    if weights in (None, "None", "null", ""):
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    enum = tvm.get_model_weights(name)
    key = str(weights).split(".")[-1]
    choices = [w.name for w in enum] + ["DEFAULT"]
    if key not in choices:
        raise ValueError(f"model.net.weights={weights!r} is not a weights name of {name}; allowed: {', '.join(choices)}")
    entry = enum.DEFAULT if key == "DEFAULT" else enum[key]
    try:
        model = tvm.get_model(name, weights=entry, **kwargs)
    except OSError as err:  # URLError is an OSError: no network and no cached file
        raise ValueError(
            f"model.net.weights={weights!r}: {name} weights are not in the torch hub cache and could not be "
            f"downloaded ({type(err).__name__}: {err}); put the file at {hub_cache_file(entry)} "
            f"(from {entry.url}) or set TORCH_HOME to a directory holding hub/checkpoints/"
        ) from err
    if len(entry.meta["categories"]) != num_classes:
        replace_head(model, num_classes)
    return model
