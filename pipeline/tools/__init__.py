"""What a user runs beside the stages: the `ikl-pipeline` / `python -m pipeline` commands
(`cli`), the store inspector, the figures and the params presets."""
