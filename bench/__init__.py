"""Speed and quality measurements, one script each; run from the repository root as `python bench/NAME.py ...` or
`python -m bench.NAME ...`:

    step      a training step of our decoder vs transformers' LlamaForCausalLM (same weights, same batch)
    train     stage-1 / stage-2 training throughput and MFU through pretrain.py's own loop
    sample    KV-cached generation vs transformers' generate
    tokens    tokenize_data.py's throughput vs the bare VQ-GAN encoder
    vqgan     a VQ-GAN's round-trip PSNR, codebook use and palette survival; encode/decode speed
"""
