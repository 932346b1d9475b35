"""Stage `prepare`: a data source (embedded, split lists, CIFAR, an image folder) -> WebDataset
tar shards + manifest.json (`shards.prepare_shards`)."""
