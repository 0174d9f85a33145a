"""
Model sizes (Table 7) and training stages (Table 8), as plain dicts.

    from configs import MODEL_SIZES, STAGES
    args = ModelArgs(**MODEL_SIZES["300M"])
    hyper = STAGES["pretrain"]          # each value overridable on the command line as --key=value

Every size uses the VQ-GAN's 8192-code vocabulary and untied input/output embeddings, except `tiny`
and `small` (the toy world's 512-code tokenizer, 16 tokens per 32x32 image) and `lvm-7b`
(LVM's released checkpoint: 8292 = 8192 codes plus 100 unused slots).
"""

# Table 7: model architectures. hidden_dim is the paper's "MLP dim" (SwiGLU width).
MODEL_SIZES = {
    # the toy world's models: 16 toy images of 16 tokens fill their 256-token context. tiny trains
    # on a laptop CPU in minutes, small is for the toy world on a GPU
    "tiny": dict(dim=128, n_layers=4, n_heads=4, hidden_dim=384, vocab_size=512, max_seq_len=256),
    # beside tiny for the toy world's scaling study (Table 6 in miniature): about 1/3 and 3x it
    "micro": dict(dim=64, n_layers=4, n_heads=4, hidden_dim=192, vocab_size=512, max_seq_len=256),
    "mini": dict(dim=192, n_layers=6, n_heads=6, hidden_dim=512, vocab_size=512, max_seq_len=256),
    "small": dict(dim=256, n_layers=8, n_heads=8, hidden_dim=768, vocab_size=512, max_seq_len=256),
    "300M": dict(dim=1024, n_layers=22, n_heads=8, hidden_dim=2688, vocab_size=8192,
                 max_seq_len=4096),
    "600M": dict(dim=1536, n_layers=22, n_heads=16, hidden_dim=4096, vocab_size=8192,
                 max_seq_len=4096),
    "1B": dict(dim=2048, n_layers=22, n_heads=16, hidden_dim=5504, vocab_size=8192,
               max_seq_len=4096),
    "3B": dict(dim=3200, n_layers=26, n_heads=32, hidden_dim=8640, vocab_size=8192,
               max_seq_len=4096),
    # LVM's released LLaMA-7B (Emma02/LVM_ckpts): load its weights with checkpoint.load_model(dir)
    "lvm-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                   vocab_size=8292, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=4096),
}

# Table 8: optimisation of the two stages. batch_size counts sequences per optimizer step
# (global, over all devices), reached by gradient accumulation;
# seq_len = images_per_seq * tokens_per_image.
STAGES = {
    "pretrain": dict(  # stage 1: single images, 256 tokens each
        lr=1.5e-4, min_lr=1.5e-5, warmup_steps=2000, max_steps=125112, batch_size=8192,
        images_per_seq=1, tokens_per_image=256,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0),
    "finetune": dict(  # stage 2: 16-image sequences, 4096 tokens
        lr=1.5e-5, min_lr=1.5e-6, warmup_steps=0, max_steps=15639, batch_size=512,
        images_per_seq=16, tokens_per_image=256,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0),
    # the same two stages for the toy world (32x32 images, 16 tokens each): minutes on a CPU. Higher
    # learning rates suit the small models; everything else keeps Table 8's shape.
    "pretrain-toy": dict(
        lr=1e-3, min_lr=1e-4, warmup_steps=50, max_steps=200, batch_size=128,
        images_per_seq=1, tokens_per_image=16,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0),
    "finetune-toy": dict(  # 16 images x 16 tokens = 256, the toy models' whole context
        lr=2e-3, min_lr=2e-4, warmup_steps=0, max_steps=1500, batch_size=8,
        images_per_seq=16, tokens_per_image=16,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0),
}

# The paper's own figures, printed beside ours by `python model.py --size ...` and checked by the
# tests.
TABLE7_PARAMS_M = {  # with vocabulary 8192, untied embeddings
    "300M": 291, "600M": 648, "1B": 1147, "3B": 3274,
}
TABLE4_TFLOPS = {  # forward TFLOPs at batch 1: {sequence length: TFLOPs}
    "300M": {256: 0.2, 4096: 4.1}, "600M": {256: 0.4, 4096: 7.9},
    "1B": {256: 0.6, 4096: 12.8}, "3B": {256: 1.7, 4096: 33.0},
}

