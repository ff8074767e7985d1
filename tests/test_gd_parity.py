"""Every model-dependent entry of diffusion.npz (ops.* with the unet_cond32 model and the
classifier32 classifier, loop.* with unet_uncond32) against the compat façade."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import guidance as G
from diffjax.compat import gd_models
from diffjax.compat import guided_diffusion as gdc
from tests._util import nchw_to_nhwc, rel_err

SINGLE = 1e-5  # single model / diffusion calls on 32x32 models
LOOP = 1e-4  # after a sampling loop


def _load(golden, name):
    g = golden(name)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in g.config["model_kwargs"].items()}
    module = gd_models.build(g.config["model_class"], **kwargs)
    return module, gd_models.load_state_dict(module, g.state_dict())


@pytest.fixture(scope="module")
def ops(golden):
    g = golden("diffusion")
    unet, unet_vars = _load(golden, "unet_cond32")
    clf, clf_vars = _load(golden, "classifier32")

    def model_fn(x, t, y=None):
        return unet.apply(unet_vars, x, t, y=y)

    guide = G.classifier(lambda x, t: clf.apply(clf_vars, x, t), scale=2.0)

    def cond_fn(x, t, y=None):
        return guide.grad(x, t, {"y": y})

    arr = lambda k: jnp.asarray(nchw_to_nhwc(g[k]))  # noqa: E731
    return dict(g=g, model_fn=jax.jit(model_fn), cond_fn=jax.jit(cond_fn), arr=arr,
                gd=gdc.create_gaussian_diffusion(steps=1000, noise_schedule="cosine",
                                                 learn_sigma=True),
                x_t=arr("ops.x_t"), t=jnp.asarray(g["ops.t"]), y=jnp.asarray(g["ops.y"]))


def check(got, ref, tol=SINGLE, per_item=False):
    got = np.broadcast_to(np.asarray(got), np.shape(ref))
    if per_item:  # entries the reference itself amplifies (t = 999): each item against its scale
        for i in range(ref.shape[0]):
            assert rel_err(got[i], ref[i]) <= tol, (i, rel_err(got[i], ref[i]))
    else:
        assert rel_err(got, ref) <= tol, rel_err(got, ref)


def test_classifier_gradient(ops):
    check(ops["cond_fn"](ops["x_t"], ops["t"], y=ops["y"]), nchw_to_nhwc(ops["g"]["ops.cond_fn.grad"]))


def test_p_mean_variance(ops):
    g, gd, kw = ops["g"], ops["gd"], {"y": ops["y"]}
    out = gd.p_mean_variance(ops["model_fn"], ops["x_t"], ops["t"], model_kwargs=kw)
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        check(out[name], nchw_to_nhwc(g[f"ops.p_mean_variance.{name}"]))
    out = gd.p_mean_variance(ops["model_fn"], ops["x_t"], ops["t"], clip_denoised=False,
                             model_kwargs=kw)
    check(out["mean"], nchw_to_nhwc(g["ops.p_mean_variance_noclip.mean"]))
    check(out["pred_xstart"], nchw_to_nhwc(g["ops.p_mean_variance_noclip.pred_xstart"]),
          tol=1e-4, per_item=True)


def test_condition_mean_and_score(ops):
    g, gd, kw = ops["g"], ops["gd"], {"y": ops["y"]}
    pmv = {k: ops["arr"](f"ops.p_mean_variance.{k}")
           for k in ("mean", "variance", "log_variance", "pred_xstart")}
    check(gd.condition_mean(ops["cond_fn"], pmv, ops["x_t"], ops["t"], model_kwargs=kw),
          nchw_to_nhwc(g["ops.condition_mean"]))
    out = gd.condition_score(ops["cond_fn"], pmv, ops["x_t"], ops["t"], model_kwargs=kw)
    for name in ("mean", "variance", "log_variance"):
        check(out[name], nchw_to_nhwc(g[f"ops.condition_score.{name}"]))
    check(out["pred_xstart"], nchw_to_nhwc(g["ops.condition_score.pred_xstart"]), tol=1e-4,
          per_item=True)


@pytest.mark.parametrize("cond", [False, True])
def test_p_sample(ops, cond):
    g, suffix = ops["g"], "_cond" if cond else ""
    out = ops["gd"].p_sample(ops["model_fn"], ops["x_t"], ops["t"], model_kwargs={"y": ops["y"]},
                             cond_fn=ops["cond_fn"] if cond else None,
                             noise=ops["arr"]("ops.step_noise"))
    check(out["sample"], nchw_to_nhwc(g[f"ops.p_sample{suffix}.sample"]))
    check(out["pred_xstart"], nchw_to_nhwc(g[f"ops.p_sample{suffix}.pred_xstart"]))


@pytest.mark.parametrize("eta", ["000", "050"])
@pytest.mark.parametrize("cond", [False, True])
def test_ddim_sample(ops, eta, cond):
    g, suffix = ops["g"], "_cond" if cond else ""
    out = ops["gd"].ddim_sample(ops["model_fn"], ops["x_t"], ops["t"],
                                model_kwargs={"y": ops["y"]},
                                cond_fn=ops["cond_fn"] if cond else None, eta=int(eta) / 100,
                                noise=ops["arr"]("ops.step_noise"))
    # pred_xstart after condition_score is not re-clipped: t=999 amplifies it (per-item check).
    check(out["sample"], nchw_to_nhwc(g[f"ops.ddim_sample_eta{eta}{suffix}.sample"]))
    check(out["pred_xstart"], nchw_to_nhwc(g[f"ops.ddim_sample_eta{eta}{suffix}.pred_xstart"]),
          tol=1e-4 if cond else SINGLE, per_item=cond)


def test_training_losses(ops):
    g, kw = ops["g"], {"y": ops["y"]}
    x0, noise = ops["arr"]("ops.x_start"), ops["arr"]("ops.noise")
    out = ops["gd"].training_losses(ops["model_fn"], x0, ops["t"], model_kwargs=kw, noise=noise)
    for name in ("loss", "mse", "vb"):
        check(out[name], g[f"ops.training_losses.{name}"])
    r50 = gdc.create_gaussian_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=True,
                                        rescale_learned_sigmas=True, timestep_respacing="50")
    out = r50.training_losses(ops["model_fn"], x0, jnp.asarray(g["ops.training_losses_rmse_r50.t"]),
                              model_kwargs=kw, noise=noise)
    for name in ("loss", "mse", "vb"):
        check(out[name], g[f"ops.training_losses_rmse_r50.{name}"])
    kl = gdc.create_gaussian_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=True,
                                       use_kl=True)
    out = kl.training_losses(ops["model_fn"], x0, ops["t"], model_kwargs=kw, noise=noise)
    check(out["loss"], g["ops.training_losses_kl.loss"])
    assert set(out) == {"loss"}


@pytest.mark.parametrize("t", [0, 500])
def test_vb_terms_bpd(ops, t):
    g = ops["g"]
    x0 = ops["arr"]("ops.x_start")
    out = ops["gd"]._vb_terms_bpd(ops["model_fn"], x0, ops["arr"](f"ops.vb_t{t}.x_t"),
                                  jnp.full((3,), t), model_kwargs={"y": ops["y"]})
    check(out["output"], g[f"ops.vb_t{t}.output"])
    check(out["pred_xstart"], nchw_to_nhwc(g[f"ops.vb_t{t}.pred_xstart"]))


@pytest.fixture(scope="module")
def loop(golden):
    g = golden("diffusion")
    unet, variables = _load(golden, "unet_uncond32")
    gd = gdc.create_gaussian_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=False,
                                       timestep_respacing="ddim25")
    np.testing.assert_array_equal(gd.timestep_map, g.config["loop"]["timestep_map"])
    return g, gd, (lambda x, t: unet.apply(variables, x, t))


def test_ddim25_loop(loop):
    g, gd, model_fn = loop
    x_T = jnp.asarray(nchw_to_nhwc(g["loop.x_T"]))
    run = jax.jit(lambda x: gd.ddim_sample_loop_progressive(model_fn, x.shape, noise=x))
    out = run(x_T)
    check(out["sample"][-1], nchw_to_nhwc(g["loop.ddim25.sample"]), tol=LOOP)
    check(out["sample"], nchw_to_nhwc(g["loop.ddim25.samples"]), tol=LOOP)
    check(out["pred_xstart"], nchw_to_nhwc(g["loop.ddim25.pred_xstart"]), tol=LOOP)


def test_p25_loop(loop):
    g, gd, model_fn = loop
    x_T = jnp.asarray(nchw_to_nhwc(g["loop.x_T"]))
    noises = jnp.asarray(nchw_to_nhwc(g["loop.p25.noises"]))
    run = jax.jit(lambda x, n: gd.p_sample_loop(model_fn, x.shape, noise=x, step_noise=n))
    check(run(x_T, noises), nchw_to_nhwc(g["loop.p25.sample"]), tol=LOOP)
