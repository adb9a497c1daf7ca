"""Data: Cityscapes pairs, transforms, the shard cache, loaders, sampler, synthetic data, device augmentation."""
