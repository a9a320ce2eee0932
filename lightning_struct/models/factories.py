"""Model factories usable as Hydra ``_target_``s (no weights are ever downloaded)."""

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


def torchvision_model(name: str, num_classes: int = 1000, **kwargs: object) -> nn.Module:
    """Any ``torchvision.models`` builder by name, randomly initialised (``weights=None``).

    Raises ``ValueError`` listing close names when ``name`` is unknown.
    """
    import torchvision.models as tvm

    if kwargs.get("weights") not in (None, "None"):
        raise ValueError(
            f"model.net.weights={kwargs['weights']!r}: pretrained weights are not downloaded by lightning-struct; "
            "load a local checkpoint instead (ckpt_path=...)"
        )
    kwargs.pop("weights", None)
    available = tvm.list_models()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(f"unknown torchvision model {name!r}; did you mean one of {close}?")
    return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
