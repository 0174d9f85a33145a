"""The machinery the method calls by name and a learner can skip: checkpoints (whole and
sharded, LLaMA and VQ-GAN), devices and processes (DDP, FSDP2, XLA SPMD), the settings reader, a
training run's log and sample grids, the one image reader, opt-in fast decoding, and the feature
networks behind FID and FVD."""
