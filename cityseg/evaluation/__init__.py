"""Evaluation: mIoU over a split, prediction files, sliding/flip/multi-scale inference, metrics."""
