"""dlas-search: search the Deep Learning Acceleration Stack (data, model, compression,
algorithms, compiler, hardware) with Optuna, Apache TVM and MLflow.

The command is `dlas` (cli.py); one trial is `pipeline.run(config)`; a configuration comes from
a space file (`space.load_space`). docs/architecture.md describes the design.
"""
__all__: list[str] = []
