"""What a run reports: console, throughput and MFU, JSONL, W&B, TensorBoard, profiler."""
