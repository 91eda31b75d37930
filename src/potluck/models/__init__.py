"""Reference models: logistic regression, McMahan et al.'s 2NN and CNN, a small CNN.

Example:
    >>> from potluck.models import build_model
    >>> model = build_model("mlp2nn", input_shape=(1, 28, 28), num_classes=10)
    >>> sum(p.numel() for p in model.parameters())
    199210
"""

from potluck.models.zoo import available_models, build_model

__all__ = ["available_models", "build_model"]
