"""The generic :class:`ImageClassifier` LightningModule and model factories."""

from lightning_struct.models.classifier import ImageClassifier
from lightning_struct.models.factories import SmallCNN, digits_cnn, torchvision_model

__all__ = ["ImageClassifier", "SmallCNN", "digits_cnn", "torchvision_model"]
