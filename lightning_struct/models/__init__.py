"""The generic :class:`ImageClassifier` LightningModule and model factories."""

from lightning_struct.models.classifier import ImageClassifier, load_classifier
from lightning_struct.models.factories import SmallCNN, digits_cnn, torchvision_model

__all__ = ["ImageClassifier", "load_classifier", "SmallCNN", "digits_cnn", "torchvision_model"]
