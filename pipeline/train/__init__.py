"""Training: the entry point (cli, `python -m pipeline.train`), the config, the trainer and
its parts (engines, objectives, schedules, EMA, checkpoints, metrics, health, preemption,
the dry run, and the callbacks the fault-injection tests install)."""
