"""AlexNet / CaffeNet with ACDC fully connected layers (Moczulski et al. 2016, section 6.2).

torchvision's AlexNet classifier is
``Dropout, fc6 Linear(9216, 4096), ReLU, Dropout, fc7 Linear(4096, 4096), ReLU, fc8 Linear(4096, C)``.
:func:`alexnet_acdc` replaces fc6 and fc7 by :class:`~lightning_struct.nn.acdc.ACDCStack` of
``n_factors`` (12) factors with ReLU and fixed random permutations between factors; everything
else (convolutions, dropouts, the ReLUs after fc6/fc7, fc8) is unchanged. fc6 maps 9216 -> 4096:
its stack works on ``N = 9216`` features and crops the output to 4096 (see
:class:`~lightning_struct.nn.acdc.ACDCStack`).

Parameter counts (1000 classes, 12 factors with biases; computed):

===============================  ===========
model                            parameters
===============================  ===========
torchvision alexnet (dense)      61,100,840
fc6 + fc7 dense                  54,534,144
alexnet_acdc                      7,205,672
fc6 + fc7 as ACDC                   638,976
===============================  ===========
"""

from __future__ import annotations

from torch import nn

from lightning_struct.nn.acdc import ACDCStack

__all__ = ["alexnet_acdc"]


def alexnet_acdc(
    num_classes: int = 1000,
    n_factors: int = 12,
    sigma: float = 0.01,
    relu: bool = True,
    permute: bool = True,
    bias: bool = True,
    seed: int = 0,
    dropout: float = 0.5,
) -> nn.Module:
    """torchvision AlexNet (``weights=None``) with fc6/fc7 as ACDC stacks.

    Args:
        num_classes: fc8 outputs.
        n_factors, sigma, relu, permute, bias: :class:`ACDCStack` settings of both layers.
        seed: permutation seed of fc6 (fc7 uses ``seed + 1``).
        dropout: AlexNet's dropout probability.
    """
    import torchvision

    model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    kw = {"n_factors": n_factors, "sigma": sigma, "relu": relu, "permute": permute, "bias": bias}
    fc6, fc7 = model.classifier[1], model.classifier[4]
    if not (isinstance(fc6, nn.Linear) and isinstance(fc7, nn.Linear)):  # pragma: no cover
        raise RuntimeError("unexpected torchvision AlexNet classifier layout")
    model.classifier[1] = ACDCStack(fc6.in_features, fc6.out_features, seed=seed, **kw)
    model.classifier[4] = ACDCStack(fc7.in_features, fc7.out_features, seed=seed + 1, **kw)
    return model
