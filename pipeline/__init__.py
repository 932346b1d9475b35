"""Decoupled-KL (IKL) knowledge distillation on long-tailed image data, with cached teacher
logits: prepare shards -> train teachers -> dump top-k logits -> train students -> evaluate."""
