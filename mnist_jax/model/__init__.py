"""The network: the Keras mnist_mlp as a Flax module with Keras's initializers and RMSprop (`mlp`), and the
Keras HDF5 file that holds it (`keras_h5`)."""
