"""cifar_lightning: a faithful, fast PyTorch Lightning + Hydra port of a Keras CIFAR-10 notebook."""

__version__ = "0.1.0"
