"""Training: the config, the step programs of K lanes, the one loop, checkpoints, metrics and the job.

Layers inside, each using those before it: `config` (every setting, declared
once) -> `parallel` (the mesh) and `placement` (data on it) -> `steps` (the
jitted programs) -> `checkpoint`, `metrics`, `writer` -> `run` (building a
run), `outputs` (what a lane writes), `lanes` (trials in and out), `loop` (the
epochs) -> `job` (one trial). `source` is the seam through which trials reach
the loop. Importing this package imports no JAX.
"""
