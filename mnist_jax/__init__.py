"""mnist-jax: the Keras MNIST MLP as a data-parallel JAX/Flax trainer."""

__version__ = "0.1.0"
