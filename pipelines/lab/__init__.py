"""The ladder lab: the synthetic world, and training, distilling and self-pruning ladders on it."""
