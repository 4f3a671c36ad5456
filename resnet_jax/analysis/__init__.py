"""Analyses of trained and freshly initialised networks, as in the papers' figures and tables.

Each module is a library and a command-line tool (``python -m resnet_jax.analysis.<name> --help``):

* ``layer_responses``: the standard deviation of each conv layer's output after its BN, before the
  ReLU or the addition (paper 1, Fig. 7).
* ``gradient_flow``: the norm of the loss gradient of every weight layer against depth.
* ``curves``: training and test error against iterations, plain vs residual (paper 1, Fig. 6).
* ``results_table``: final test error, mean +- std over seeds, beside the papers' numbers.

``load_model(workdir, checkpoint)`` (from ``common``) restores a trained run's network for
inference or fine-tuning, without its dataset.

Importing this package imports nothing heavy; ``curves`` never imports JAX.
"""
