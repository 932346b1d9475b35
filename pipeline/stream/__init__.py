"""What feeds a model: the tar shards read in order (`tars`), decoded on the CPU or the device
(`device_decode`), cut into seeded views (`augment`), paired with the logit store and batched
(`loader`)."""
