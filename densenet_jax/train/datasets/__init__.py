"""TFDS builders that ship with densenet-jax (importing this registers them)."""

from densenet_jax.train.datasets.sklearn_digits import SklearnDigits

__all__ = ['SklearnDigits']
