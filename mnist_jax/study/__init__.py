"""Hyperparameter studies, the way Vertex AI runs them, on Optuna.

`spec` reads legacy and Vertex study configs; `search` maps them onto Optuna's
samplers and pruners; `store` keeps the study in its storage (slots,
snapshot, reports), over `rdb` (the only module that touches Optuna's private
API) and `heartbeat` (which worker runs what); `driver` runs one worker's
trials, as processes (`processes`) or in lanes of one training program
(`lanes`); `population` decides population-based training's exploits and
recipes, and `pbt` runs a population in lanes; `record` makes the content of
`study.json`, `study.png` and `pbt.png`; `cli` is `tune`'s command line.
Importing this package imports no JAX and no Optuna.
"""
