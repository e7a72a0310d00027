"""What every layer shares: user-facing errors, the console, file storage, signals, the command line, trial statuses.

Nothing here imports JAX, so `--help` and flag errors answer before it loads.
"""
