"""GLIDE training (conditioning="text"): captions in the batch, caption dropout, inpainting masks
and zero-initialised new input channels, and - slow - a tiny text-conditional model that follows
its prompts better with classifier-free guidance than without."""
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import diffjax
from diffjax import conditioning as C
from diffjax import data as data_lib
from diffjax import parallel
from diffjax import tokenizer as tokenizer_lib
from diffjax.compat import glide_text2im as GT
from diffjax.pipelines import training as train_lib
from diffjax.pipelines.training import finetune
from diffjax.pipelines.training import state as state_lib
from tests._tiny_glide import TINY_FLAGS, write_vocab

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
COLOURS = ("red", "green", "blue")  # channel index = position


def _config(vocab, size=16, caption_dropout=0.2, inpaint=False, **train):
    sys.path.insert(0, str(CONFIGS))
    try:
        import glide_shapes
    finally:
        sys.path.pop(0)
    c = glide_shapes.get_config()
    c.data.update(image_size=size, tokenizer=str(vocab), text_ctx=4, random_flip=False)
    # TINY_FLAGS in the network's own terms
    c.model = ml_collections.ConfigDict(dict(
        model_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_heads=1,
        num_head_channels=-1, attention_resolutions=(8,), dropout=0.0, xf_width=32, xf_layers=1,
        xf_heads=2, xf_final_ln=True, xf_padding=True, use_scale_shift_norm=True,
        resblock_updown=True))
    c.conditioning = {"text": dict(dropout=caption_dropout), **({"inpaint": {}} if inpaint else {})}
    c.train.update(**{"batch_size": 16, "total_steps": 400, "compute_dtype": "float32", **train})
    c.optim.update(lr=2e-3, warmup_steps=20)
    return c


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"))


def test_shapes_batches_carry_tokens_of_their_captions(vocab):
    cfg = data_lib.DataConfig(source="shapes", image_size=16, channels=3, captions="caption",
                              tokenizer=str(vocab), text_ctx=4, random_flip=False)
    batch = data_lib.make_iterator(cfg, 8).next()
    assert batch["image"].shape == (8, 16, 16, 3) and batch["tokens"].shape == (8, 4)
    assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == bool
    tok = tokenizer_lib.load(str(vocab))
    for image, tokens, mask, label in zip(batch["image"], batch["tokens"], batch["mask"],
                                          batch["label"]):
        caption = tok.decode(tokens[mask])
        colour, kind = caption.split()
        assert (colour, kind) == (COLOURS[label // 2], ("square", "circle")[label % 2])
        assert mask.sum() == 2 and np.all(tokens[~mask] == tok.end_token)  # the tiny vocab's words
        fg = image[image.max(-1) > 0]  # the shape's pixels are the prompt's colour
        assert len(fg) and np.argmax(fg.mean(0)) == COLOURS.index(colour)


def test_caption_dropout_rate_and_empty_caption():
    tokens = jnp.arange(4000 * 5, dtype=jnp.int32).reshape(4000, 5) % 50
    mask = jnp.ones((4000, 5), bool)
    out, out_mask, dropped = C.drop_captions(jax.random.PRNGKey(0), tokens, mask, 0.2, 99)
    rate = float(dropped.mean())
    assert abs(rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 4000)  # binomial: 4 standard errors
    assert np.all(np.asarray(out)[np.asarray(dropped)] == 99)
    assert not np.asarray(out_mask)[np.asarray(dropped)].any()
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(dropped)],
                                  np.asarray(tokens)[~np.asarray(dropped)])


def test_random_masks_erase_a_part_of_every_image():
    masks = np.asarray(C.random_inpaint_masks(jax.random.PRNGKey(1), 256, 32))
    assert masks.shape == (256, 32, 32, 1) and set(np.unique(masks)) <= {0.0, 1.0}
    known = masks.mean(axis=(1, 2, 3))
    assert known.min() > 0 and known.max() < 1  # always something to keep and something to fill
    assert 0.2 < known.mean() < 0.9 and known.std() > 0.1  # varied, not one fixed box


def test_train_step_sees_tokens_drops_captions_and_shards_any_batch_keys(vocab):
    config = _config(vocab, caption_dropout=0.5, inpaint=True)
    trainer, data_cfg, _ = train_lib.trainer_from_config(config)
    assert type(trainer.module).__name__ == "InpaintText2ImUNet"
    text = trainer.conditioning.get(C.Text)
    assert text.pad_token == tokenizer_lib.load(str(vocab)).end_token
    batch = data_lib.make_iterator(data_cfg, 8).next()
    kwargs = trainer._model_kwargs(jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(3))
    dropped = ~np.asarray(kwargs["mask"]).any(-1)
    assert 0 < dropped.sum() < 8 and np.all(np.asarray(kwargs["tokens"])[dropped] == text.pad_token)
    np.testing.assert_array_equal(np.asarray(kwargs["tokens"])[~dropped], batch["tokens"][~dropped])
    m = np.asarray(kwargs["inpaint_mask"])
    np.testing.assert_allclose(np.asarray(kwargs["inpaint_image"]), batch["image"] * m)
    # the step jits over the mesh with the batch's own keys (image, label, tokens, mask); traced
    # only (compiling it is the slow test's job)
    mesh = parallel.make_mesh(1)
    abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    state_sh = parallel.state_shardings(mesh, abstract)
    stacked = parallel.host_to_global(jax.tree.map(lambda x: x[None], batch),
                                      parallel.batch_sharding(mesh, ndim_leading=1))
    lowered = train_lib.compile_steps(trainer, mesh, state_sh).lower(abstract, stacked)
    assert "tokens" in str(lowered.args_info)


@pytest.mark.slow  # two compiled train steps of GLIDE models: ~16 s on 2 cores
def test_inpaint_finetuning_starts_from_the_base_model_with_zero_new_channels(vocab):
    base = GT.create_model(image_size=16, text_ctx=4, n_vocab=300, use_fp16=False, **TINY_FLAGS)
    inpaint = finetune.with_class(base, GT.InpaintText2ImUNet)
    args, kwargs = base.example_inputs(2)
    base_params = jax.jit(base.init)(jax.random.PRNGKey(0), *args, **kwargs)["params"]
    shapes = jax.eval_shape(lambda: inpaint.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    params = finetune.expand_input_channels(inpaint, shapes, base, base_params)
    kernel = np.asarray(params["input_blocks_0_0"]["kernel"])
    assert kernel.shape[2] == 7
    np.testing.assert_array_equal(kernel[:, :, :3], base_params["input_blocks_0_0"]["kernel"])
    assert not kernel[:, :, 3:].any()
    # so the new model is the old function, whatever the masked image and mask
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.array([10, 900])
    tokens = jnp.array([[1, 2, 299, 299], [5, 299, 299, 299]])
    mask = tokens != 299
    want = jax.jit(base.apply)({"params": base_params}, x, t, tokens=tokens, mask=mask)
    got = jax.jit(inpaint.apply)({"params": params}, x, t, tokens=tokens, mask=mask,
                        inpaint_image=jax.random.normal(jax.random.PRNGKey(2), x.shape),
                        inpaint_mask=jnp.ones((2, 16, 16, 1)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="no \\['inpaint_image', 'inpaint_mask'\\] input"):
        finetune.expand_input_channels(base, base_params, inpaint, params)


def prompt_following(images, colours) -> float:
    """Fraction of samples whose shape has the prompt's colour: the shape is the set of pixels far
    (> 0.5 in some channel) from the background, the median colour of the border pixels, and its
    colour is the channel by which it exceeds the background most. 1/3 is chance for three colours.
    (A tiny model trained for minutes gets the black background only roughly right - tinted
    backgrounds are common at both scales - so the background is measured, not assumed.)"""
    hits = []
    for image, colour in zip(np.asarray(images), colours):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.median(border, axis=0)
        shape = image[np.abs(image - background).max(-1) > 0.5]
        hits.append(bool(len(shape)) and
                    int(np.argmax(shape.mean(0) - background)) == COLOURS.index(colour))
    return float(np.mean(hits))


@pytest.mark.slow
def test_tiny_text_model_follows_prompts_better_with_guidance(vocab):
    config = _config(vocab, caption_dropout=0.2, total_steps=400, ema_rates=(0.99,))
    experiment, trainer, _ = train_lib.experiment_and_trainer(config)
    data_cfg = experiment.data
    mesh = parallel.make_mesh(1)
    state, state_sh = state_lib.create_state(trainer.init, mesh, jax.random.PRNGKey(0))
    step_fn = train_lib.compile_steps(trainer, mesh, state_sh)
    iterator = data_lib.make_iterator(data_cfg, trainer.config.batch_size)
    sharding = parallel.batch_sharding(mesh, ndim_leading=1)
    start = time.perf_counter()
    for _ in range(trainer.config.total_steps):
        state, metrics = step_fn(state, parallel.host_to_global(iterator.next(1), sharding))
    loss = float(metrics["loss"][0])
    train_s = time.perf_counter() - start

    colours = [c for c in COLOURS for _ in range(8)]
    prompts = [f"{c} {('square', 'circle')[i % 2]}" for i, c in enumerate(colours)]
    model = train_lib.model_from_state(experiment, state, use=0)
    scores = {}
    for scale in (0.0, 3.0):
        images = diffjax.sample(model, jax.random.PRNGKey(7), len(prompts), prompts=prompts,
                                guidance_scale=scale, steps="50", sampler="ddpm")
        images = images.astype(np.float32) / 127.5 - 1  # uint8 -> [-1, 1]
        scores[scale] = prompt_following(images, colours)
    print(f"\nprompt following: cfg 0 -> {scores[0.0]:.3f}, cfg 3 -> {scores[3.0]:.3f} "
          f"({len(prompts)} samples); {trainer.config.total_steps} steps in {train_s:.1f} s, "
          f"final loss {loss:.4f}")
    assert scores[3.0] >= 0.8 and scores[3.0] > scores[0.0] + 0.2
