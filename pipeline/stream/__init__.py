"""What feeds a model: the tar shards read in order (`tars`), which crops each epoch sees
(`views`), each image decoded once on the CPU (`decode`) or on the device (`device_decode`)
and cut into its seeded views (`augment`), paired with the logit store and batched (`loader`)."""
