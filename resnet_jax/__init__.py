"""resnet_jax: residual networks in JAX / Flax NNX.

Importing the package (models, summary) never imports TensorFlow; TensorFlow is loaded only
when a TFDS dataset is built.
"""

__version__ = "0.1.0"
