"""The data: dataset files read safely and validated (`dataset`), and MNIST fetched and verified (`download`).

Free of JAX: arrays stay numpy here; the training layer places them on devices.
"""
