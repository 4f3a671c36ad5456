"""resnet_jax: residual networks in JAX / Flax NNX.

Importing the package (models, summary) never imports TensorFlow; TensorFlow is loaded only
when a TFDS dataset is built.
"""

import os as _os

__version__ = "0.1.0"

# `import tensorflow` (for the TFDS datasets and the input-pipeline benchmark) also imports all
# of Keras 3 eagerly, to register its optimizers for SavedModel loading: 2.5 of its 9.4 CPU
# seconds on a 2-core machine, in every CIFAR or ImageNet process. Nothing here uses Keras. With
# legacy Keras selected and tf_keras not installed, TensorFlow skips that import (set
# TF_USE_LEGACY_KERAS=0 to have tf.keras in a process that imports resnet_jax).
_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
