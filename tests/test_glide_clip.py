"""GLIDE's noised CLIP against openai/glide-text2im: the golden vectors of
../shared/parity/glide_clip_tiny.npz (tokenizer on 268 strings with the real vocabulary, text and
image embeddings, similarities, cond_fn gradients, through a respaced sampler's timesteps), the
state-dict layout of the released clip_text_enc.pt / clip_image_enc.pt, and the converter on .pt
files written without torch."""
import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.compat import gd_models
from diffjax.compat import glide_clip as GC
from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as S
from diffjax.core.schedules import make_schedule
from diffjax.models import clip as C
from tests._util import PARITY, nchw_to_nhwc, rel_err, require
from tests.test_torch_pt import state_dict_file

TOL = 4e-6  # compat_guided_diffusion.md, GLIDE noised CLIP (LayerNorm eps 1e-6 shows up at 5e-6)
VOCAB = PARITY / "vocab" / GC.CLIP_VOCAB_FILE


def encoder_state_dicts(g):
    """The golden state dict split into the two files' layouts (prefixes removed)."""
    sd = g.state_dict()
    return tuple({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                 for prefix in ("text_encoder.", "image_encoder."))


@pytest.fixture(scope="module")
def tiny(golden):
    g = golden("glide_clip_tiny")
    clip = GC.create_clip_model(g.config["clip_config"], tokenizer=require(VOCAB))
    variables = GC.load_clip_state_dict(clip, *encoder_state_dicts(g))
    prompts = [str(p) for p in g["in.prompts"]]
    return g, clip, variables, prompts


# --- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_matches_simple_tokenizer(golden):
    g = golden("glide_clip_tiny")
    tok = GC.clip_tokenizer(require(VOCAB).parent)
    off, ids = g["out.tok_offsets"], g["out.tok_ids"]
    wrong = []
    for i, text in enumerate(str(s) for s in g["in.tok_strings"]):
        want = ids[off[i]:off[i + 1]].tolist()
        got = tok.encode(text)
        padded, length = tok.padded_tokens_and_len(got, 77)
        if (tok.clean_text(text) != str(g["out.tok_clean"][i]) or got != want
                or tok.decode(want) != str(g["out.tok_decoded"][i])
                or padded != g["out.tok_padded77"][i].tolist() or length != g["out.tok_len77"][i]):
            wrong.append(repr(text)[:60])
    assert not wrong, (f"{len(wrong)} of {len(off) - 1} strings differ (the ids were made with ftfy "
                       f"{g.config['env']['ftfy']}; installed: {ftfy.__version__}): {wrong[:5]}")


def test_prompt_tokens(tiny):
    g, clip, _, prompts = tiny
    tokens, lens = clip.encode_prompts(prompts)
    np.testing.assert_array_equal(tokens, g["out.prompt_tokens"])
    np.testing.assert_array_equal(lens, g["out.prompt_lens"])


# --- forward ---------------------------------------------------------------------------------------

def test_text_embeddings_match_golden(tiny):
    g, clip, variables, prompts = tiny
    text_vars = {"params": variables["params"]["text_encoder"]}
    tokens, lens = g["out.prompt_tokens"], g["out.prompt_lens"]
    z = clip.text_encoder.apply(text_vars, tokens, lens)
    assert rel_err(z, g["out.text_z"]) <= TOL
    assert rel_err(clip.text_embeddings(variables, prompts), g["out.text_emb"]) <= TOL
    # Causal attention read at text_len - 1: whatever follows the end token changes nothing.
    junk = np.where(np.arange(tokens.shape[1]) >= lens[:, None], 49407, tokens)
    np.testing.assert_array_equal(clip.text_encoder.apply(text_vars, junk, lens), z)


def test_image_embeddings_match_golden(tiny):
    g, clip, variables, _ = tiny
    x_t, t = nchw_to_nhwc(g["in.x_t"]), g["in.t"]
    image_vars = {"params": variables["params"]["image_encoder"]}
    z, state = clip.image_encoder.apply(image_vars, (x_t + 1) * 127.5, t,
                                        capture_intermediates=lambda m, _: m.name == "input",
                                        mutable=["intermediates"])
    tokens = state["intermediates"]["input"]["__call__"][0]  # w_t[t], patches row-major, + w_pos, ln
    assert rel_err(tokens, g["out.image_input_block"]) <= TOL
    assert rel_err(z, g["out.image_z"]) <= TOL
    assert rel_err(clip.image_embeddings(variables, x_t, t), g["out.image_emb"]) <= TOL


def test_similarities_and_loss_match_golden(tiny):
    g, clip, variables, prompts = tiny
    text = clip.text_embeddings(variables, prompts)
    image = clip.image_embeddings(variables, nchw_to_nhwc(g["in.x_t"]), g["in.t"])
    assert rel_err(np.sum(np.asarray(text) * np.asarray(image), -1), g["out.sim"]) <= TOL
    assert rel_err(np.asarray(image) @ np.asarray(text).T, g["out.sim_matrix"]) <= TOL
    assert clip.module.exp_logit_scale == g["out.exp_logit_scale"][0]  # 100.0000076, not 100
    per_image = clip.module.apply(variables, nchw_to_nhwc(g["in.x_t"]), g["in.t"], text,
                                  method="similarity")
    assert rel_err(np.sum(per_image), g["out.loss"][0]) <= TOL


# --- guidance --------------------------------------------------------------------------------------

def test_cond_fn_matches_golden(tiny):
    g, clip, variables, prompts = tiny
    x_t, t = nchw_to_nhwc(g["in.x_t"]), g["in.t"]
    (s0, s1), unit = g["in.grad_scales"], clip.cond_fn(variables, prompts, g["in.grad_scales"][0])
    assert rel_err(unit(x_t, t, tokens=None, mask=None), nchw_to_nhwc(g["out.cond_fn.0"])) <= TOL
    assert rel_err(unit(x_t, t, grad_scale=s1), nchw_to_nhwc(g["out.cond_fn.1"])) <= TOL
    assert rel_err(clip.cond_fn(variables, prompts, s1)(x_t, t),
                   nchw_to_nhwc(g["out.cond_fn.1"])) <= TOL
    # What glide's SpacedDiffusion hands cond_fn: the original timesteps of its respaced indices.
    assert rel_err(unit(x_t, g["out.t_spaced_mapped"], grad_scale=s1),
                   nchw_to_nhwc(g["out.cond_fn.spaced"])) <= TOL
    one = clip.cond_fn(variables, [str(g["in.one_prompt"][0])], s0)
    assert rel_err(one(x_t, t), nchw_to_nhwc(g["out.cond_fn.one_prompt"])) <= TOL


def test_guidance_through_a_respaced_sampler(tiny):
    """The native transform inside the core's denoise at respaced indices: it sees the original
    timesteps (SpacedDiffusion's timestep_map) and shifts the ancestral mean by variance * grad
    (glide's condition_mean); the gradient itself is the golden out.cond_fn.spaced."""
    g, clip, variables, prompts = tiny
    x_t, t_spaced = jnp.asarray(nchw_to_nhwc(g["in.x_t"])), jnp.asarray(g["in.t_spaced"])
    schedule = make_schedule("cosine", 1000, g.config["respacing"])  # glide's squaredcos_cap_v2
    config = D.DiffusionConfig()
    t_model = D.model_timesteps(schedule, config, t_spaced)
    np.testing.assert_array_equal(t_model, g["out.t_spaced_mapped"])
    guidance = C.clip_guidance(clip.module, variables, prompts, g["in.grad_scales"][1],
                               tokenizer=clip.tokenizer)
    want = nchw_to_nhwc(g["out.cond_fn.spaced"])

    @jax.jit
    def denoise(transform):
        ctx = S.Context(schedule=schedule, model_kwargs={}, clip_denoised=True,
                        guidance=transform, config=config,
                        model_fn=lambda x, t, **kw: jnp.zeros_like(x))
        return S.denoise(ctx, x_t, t_spaced, mode="mean")

    plain, guided = denoise(G.chain()), denoise(G.chain(guidance))
    assert rel_err(guided["mean"], plain["mean"] + plain["variance"] * want) <= TOL


def test_clip_guidance_is_traced(tiny):
    """Scale and caption embedding are leaves: a new prompt or scale reuses the compiled grad."""
    g, clip, variables, prompts = tiny
    x_t, t = nchw_to_nhwc(g["in.x_t"]), g["in.t"]
    tokens = (g["out.prompt_tokens"], g["out.prompt_lens"])
    grad = jax.jit(lambda tr, x, t: tr.grad(x, t, {}))
    first = grad(C.clip_guidance(clip.module, variables, tokens, 1.0), x_t, t)
    assert rel_err(first, nchw_to_nhwc(g["out.cond_fn.0"])) <= TOL
    grad(C.clip_guidance(clip.module, variables, prompts[::-1], 3.0, tokenizer=clip.tokenizer),
         x_t, t)
    assert grad._cache_size() == 1
    with pytest.raises(ValueError, match="no tokenizer"):
        C.clip_guidance(clip.module, variables, prompts, 1.0)


# --- state dicts -----------------------------------------------------------------------------------

def test_converter_reads_pt_files(tiny, tmp_path):
    g, clip, variables, _ = tiny
    text_sd, image_sd = encoder_state_dicts(g)
    loaded = GC.load_clip_state_dict(clip, state_dict_file(tmp_path / "clip_text_enc.pt", text_sd),
                                     state_dict_file(tmp_path / "clip_image_enc.pt", image_sd,
                                                     fmt="legacy"))
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    # Back to PyTorch: the reference's keys, order and values.
    for name, sd in (("text_encoder", text_sd), ("image_encoder", image_sd)):
        back = gd_models.variables_to_state_dict(getattr(clip, name),
                                                 {"params": variables["params"][name]})
        assert list(back) == g.config[f"{name}_state_dict_keys"]
        for k, v in sd.items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converter_is_strict(tiny):
    g, clip, _, _ = tiny
    text_sd, image_sd = encoder_state_dicts(g)
    bad = dict(text_sd)
    del bad["blocks.block_1.f_attn.f_q.b"]
    bad["blocks.block_1.f_attn.f_k.b"] = np.zeros(16, np.float32)  # f_k has no bias
    bad["blocks.input.w_pos"] = np.zeros((77, 16), np.float32)
    with pytest.raises(ValueError) as err:
        GC.load_clip_state_dict(clip, bad, image_sd)
    msg = str(err.value)
    assert "missing: blocks.block_1.f_attn.f_q.b [16]" in msg
    assert "unexpected: blocks.block_1.f_attn.f_k.b" in msg
    assert "blocks.input.w_pos: checkpoint [77, 16], model [20, 16]" in msg


def test_released_layout():
    """The released clip/config.yaml (parity README: text 8 x 64 wide, 12 blocks, 77 tokens, 65536
    rows; image 12 x 64 wide, 12 blocks, 64 px patches of 4 -> 257 tokens; n_embd 512)."""
    clip = GC.create_clip_model()
    text = gd_models.state_dict_shapes(clip.text_encoder)
    image = gd_models.state_dict_shapes(clip.image_encoder)
    per_block = 15  # f_attn: ln g/b, f_q w/b, f_k w, f_v w/b, f_c w/b; f_mlp: ln g/b, f_1 w/b, f_2 w/b
    assert len(text) == 2 + 12 * per_block + 3 and len(image) == 5 + 12 * per_block + 3
    assert text["blocks.input.w_voc"] == (65536, 512) and text["blocks.input.w_pos"] == (77, 512)
    assert text["blocks.block_11.f_mlp.f_1.w"] == (2048, 512)
    assert text["blocks.output.f.w"] == (512, 512)
    assert image["blocks.input.w_t"] == (1000, 768)
    assert image["blocks.input.patch_proj"] == (768, 3, 4, 4)
    assert image["blocks.input.w_pos"] == (257, 768)
    assert image["blocks.block_11.f_attn.f_k.w"] == (768, 768)
    assert image["blocks.output.f.w"] == (512, 768)
    assert clip.config["beta_schedule"] == "squaredcos_cap_v2"


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown clip_config field\(s\) \['n_layers'\]"):
        GC.create_clip_model({"n_layers": 3})
    with pytest.raises(ValueError, match="patch_size=5 does not divide image_size=64"):
        GC.create_clip_model({"patch_size": 5})
    with pytest.raises(ValueError, match="n_embd"):
        C.NoisedCLIP(C.TextEncoder(100, 8, 16, 2, 1, 8), C.ImageEncoder(16, 4, 24, 2, 1, 8))
