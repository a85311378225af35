"""Data: images, datasets and embedded suites, masks, the frozen manifest, edge maps."""
