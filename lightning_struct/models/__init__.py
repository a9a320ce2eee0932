"""The generic :class:`ImageClassifier` LightningModule and model factories."""

from lightning_struct.models.classifier import ImageClassifier, load_classifier
from lightning_struct.models.factories import SmallCNN, digits_cnn, replace_head, torchvision_model
from lightning_struct.models.init import InitReport, load_init_weights

__all__ = [
    "ImageClassifier",
    "InitReport",
    "SmallCNN",
    "digits_cnn",
    "load_classifier",
    "load_init_weights",
    "replace_head",
    "torchvision_model",
]
