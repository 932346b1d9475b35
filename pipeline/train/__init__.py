"""Stages `train_teacher`, `train_student` and `evaluate`: the two runs (`runs`), the loop they
share (`loop`), the losses, the models, their checkpoints and the evaluation."""
