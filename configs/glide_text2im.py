"""GLIDE's 64x64 text-conditional base model (Nichol et al. 2021, sec. 4.1) on image-caption pairs.

    python -m diffjax train --config configs/glide_text2im.py --workdir runs/glide \
        --config.data.source=tfds:<captioned dataset> --config.data.captions=caption \
        --config.data.tokenizer=/path/to/glide_text2im/tokenizer

The UNet is the ADM one (3 res blocks, attention at 32, 16, 8 with 64-channel heads, scale-shift
norm, BigGAN up/down) conditioned on a text transformer through its last token (added to the
timestep embedding) and all its tokens (extra keys/values in every attention layer); captions are
GPT-2 BPE tokens (text_ctx 128), dropped to the empty caption 20 % of the time for classifier-free
guidance (the paper fine-tunes with 20 % dropout; here it is on from the start). Sizes: the paper's
3.5 B-parameter model has 512 base channels and a 24-block, 2048-wide transformer; the released
"filtered" model (glide-text2im's model_and_diffusion_defaults(), 385 M) has 192 channels and a
16-block, 512-wide transformer: `get_config("filtered")` gives that one. Learned-range variance,
cosine (squaredcos_cap_v2) schedule of 1000 steps. An image folder with same-stem .txt captions
works too: --config.data.source=folder --config.data.path=DIR --config.data.captions=txt.
"""
import ml_collections

SIZES = {
    # the paper's base model
    "paper": dict(model_channels=512, xf_width=2048, xf_layers=24, xf_heads=32),
    # glide-text2im's released base (model_and_diffusion_defaults)
    "filtered": dict(model_channels=192, xf_width=512, xf_layers=16, xf_heads=8),
}


def get_config(size: str = "filtered"):
    if size not in SIZES:
        raise ValueError(f"configs/glide_text2im.py:{size}: choose one of {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.data = dict(source="folder", path="", image_size=64, channels=3, resize="center_crop",
                  random_flip=False, seed=0, captions="txt", text_ctx=128,
                  # "bytes" trains with no vocabulary file; GLIDE's GPT-2 BPE (50257 tokens, needed
                  # to fine-tune the released models): the glide_text2im/tokenizer folder.
                  tokenizer="bytes")
    c.model = dict(num_res_blocks=3, channel_mult=(1, 2, 3, 4), num_heads=1, num_head_channels=64,
                   num_heads_upsample=-1, attention_resolutions=(32, 16, 8), dropout=0.1,
                   xf_final_ln=True, xf_padding=True, use_scale_shift_norm=True,
                   resblock_updown=True, **SIZES[size])
    # glide-text2im's squaredcos_cap_v2 is the cosine schedule; GLIDE learns the variance range.
    c.diffusion = dict(beta_schedule="cosine", num_steps=1000, variance="learned_range",
                       loss="hybrid")
    c.conditioning = {"text": dict(dropout=0.2)}
    c.train = dict(task="diffusion", batch_size=2048,
                   microbatch=0, total_steps=2_500_000, ema_rates=(0.9999,), ema_warmup=False,
                   compute_dtype="auto", seed=0)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=1.0, warmup_steps=1000)
    c.checkpoint = dict(every=5_000, keep=3, keep_every=100_000)
    c.eval = dict(per_class=4, sampler="ddpm", respacing="100", guidance_scale=3.0, bpd_images=0,
                  prompts=("an oil painting of a corgi", "a red car parked by the sea"))
    c.log_every = 100
    c.init_from = ""  # e.g. a converted glide base checkpoint to fine-tune
    return c
