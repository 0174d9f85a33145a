"""Tools beside the method: training a VQ-GAN tokenizer from scratch."""
