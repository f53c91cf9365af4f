"""The one training loop, its strategies (DeepSpeed ZeRO or a single process) and callbacks.

Nothing here imports models, data or losses: a stage supplies a `task_step(batch)`.
"""
