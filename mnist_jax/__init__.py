"""mnist-jax: the Keras MNIST MLP as a data-parallel JAX/Flax trainer.

Layers, each importing only from those below it: `common` -> `data` -> `model`
-> `training` -> `study` and `serving` -> the entry modules (`train`, `tune`,
`serve`, `predict`, `export`, `download`), which parse flags, call one
function and turn its outcome into an exit status.
"""

__version__ = "0.1.0"
