"""The subclass-segmentation objective against a PyTorch reference written from the
authors' formulas (EfficientSubclassLearning: `train_c2f`, `DiceLoss`,
`gen_pseudo_labels`, `gen_mixup_labels`), plus its masking, schedules and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mimjax.models import conv_blocks
from mimjax.objectives import build_loss_fn
from mimjax.objectives import subclass_segmentation as subseg

F2C = (0, 1, 1, 1)
NUM_FINE, NUM_COARSE = 4, 2
B, S, C = 6, 8, 2
LABELLED = 2  # rows 0..1 carry fine masks, as the authors' sampler puts them first


# --------------------------------------------------------------------------- stand-ins
def make_params(seed):
    """A per-pixel linear map plus a position-dependent bias: rotating the input does not
    rotate the output, so the pseudo-label view matters."""
    r = np.random.default_rng(seed)
    return {"w_coarse": r.normal(size=(C, NUM_COARSE)).astype(np.float32) * 2,
            "w_fine": r.normal(size=(C, NUM_FINE)).astype(np.float32) * 2,
            "b_coarse": r.normal(size=(S, S, NUM_COARSE)).astype(np.float32),
            "b_fine": r.normal(size=(S, S, NUM_FINE)).astype(np.float32)}


class PixelModel:
    """JAX stand-in for a segmentation model: {"coarse_logits", "fine_logits"}."""

    def __init__(self, params):
        self.p = params

    def __call__(self, images, rng=None):
        return {"coarse_logits": images @ self.p["w_coarse"] + self.p["b_coarse"],
                "fine_logits": images @ self.p["w_fine"] + self.p["b_fine"]}


def torch_model(params, images):
    """The same model in NCHW."""
    def head(w, b):
        return torch.einsum("nchw,ck->nkhw", images, params[w]) + params[b].permute(2, 0, 1)
    return {"coarse_logit": head("w_coarse", "b_coarse"), "fine_logit": head("w_fine", "b_fine")}


def make_batch(seed, step=20000, labelled=LABELLED):
    r = np.random.default_rng(seed)
    coarse = (r.uniform(size=(B, S, S)) < 0.5).astype(np.int32)
    fine = coarse * r.integers(1, NUM_FINE, (B, S, S)).astype(np.int32)
    has_fine = np.arange(B) < labelled
    fine[~has_fine] = 0
    image = r.normal(size=(B, S, S, C)).astype(np.float32)
    mixed_image = image.copy()
    mixed_image[~has_fine] = r.normal(size=(int((~has_fine).sum()), S, S, C))
    mixed_label = (r.uniform(size=(B, S, S)) < 0.4) * r.integers(1, NUM_FINE, (B, S, S))
    mixed_label = mixed_label.astype(np.int32)
    alpha = r.choice([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], B).astype(np.float32)
    alpha[-1] = 0.0  # a row without a donor: nothing pasted
    mixed_image[-1], mixed_label[-1] = image[-1], 0
    alpha[has_fine], mixed_label[has_fine] = 0.0, 0
    return {"image": image, "label_fine": fine, "label_coarse": coarse, "has_fine": has_fine,
            "mixed_image": mixed_image, "mixed_label": mixed_label, "mix_alpha": alpha,
            "index": np.arange(B, dtype=np.int32), "step": np.int32(step)}


# --------------------------------------------------------------------------- the reference
def torch_dice(inputs, target, mask=None, smooth=1e-5):
    """The authors' DiceLoss.forward (inputs already softmaxed)."""
    n = inputs.size(1)
    if target.ndim != inputs.ndim:
        target = torch.nn.functional.one_hot(target.long(), n).permute(0, 3, 1, 2).float()
    if mask is None:
        mask = torch.ones(inputs.size(), dtype=torch.float32)
    loss = 0.0
    for i in range(n):
        p, t, m = inputs[:, i], target[:, i].float(), mask[:, i]
        dice = (2 * torch.sum(p * t * m) + smooth) / (
            torch.sum(p * p * m) + torch.sum(t * t * m) + smooth)
        loss = loss + (1 - dice)
    return loss / n


def torch_pseudo(q_soft, k_soft, q_lc, threshold):
    """The authors' gen_pseudo_labels rule, given the back-mapped view softmax."""
    pseudo = torch.zeros(q_soft.shape, dtype=torch.float32)
    for c in range(NUM_FINE):
        pseudo[:, c] = (k_soft[:, c] > threshold) & (q_soft[:, c] > threshold) & (q_lc == F2C[c])
    return pseudo


def torch_view_soft(params, q_im, k, flip_dim):
    k_im = torch.flip(torch.rot90(q_im, k=k, dims=(2, 3)), dims=(flip_dim,))
    k_soft = torch.softmax(torch_model(params, k_im)["fine_logit"], dim=1)
    return torch.rot90(torch.flip(k_soft, dims=(flip_dim,)), k=-k, dims=(2, 3))


def torch_reference(params_np, batch, view, *, mix, pseudo, mix_gradient=True):
    """train_c2f's loss sum on the official batch layout (labelled rows first); returns
    (loss, terms, grads)."""
    params = {k: torch.tensor(v, requires_grad=True) for k, v in params_np.items()}
    it = int(batch["step"])
    lbs = int(batch["has_fine"].sum())
    nchw = lambda x: torch.tensor(x).permute(0, 3, 1, 2)
    q_im, q_lc, q_lf = nchw(batch["image"]), torch.tensor(batch["label_coarse"]).long(), \
        torch.tensor(batch["label_fine"]).long()
    ce = torch.nn.CrossEntropyLoss()
    out = torch_model(params, q_im)
    soft_coarse = torch.softmax(out["coarse_logit"], 1)
    soft_fine = torch.softmax(out["fine_logit"], 1)
    terms = {"loss_coarse": 0.5 * (ce(out["coarse_logit"], q_lc) + torch_dice(soft_coarse, q_lc)),
             "loss_fine": 0.5 * (ce(out["fine_logit"][:lbs], q_lf[:lbs])
                                 + torch_dice(soft_fine[:lbs], q_lf[:lbs]))}
    threshold = max(0.999 ** (it // 10), 0.4)
    ramp = 1 / (1 + math.exp(-it // 1000))
    k, flip_axis = (int(x) for x in subseg.view_params(int(view)))
    flip_dim = flip_axis + 1  # NHWC axis 1 (H) is NCHW dim 2
    if pseudo or mix:
        with torch.no_grad():
            pseudo_lf = None
            if pseudo:
                k_soft = torch_view_soft(params, q_im[lbs:], k, flip_dim)
                pseudo_lf = torch_pseudo(soft_fine[lbs:], k_soft, q_lc[lbs:], threshold)
        if mix:
            alpha = torch.tensor(batch["mix_alpha"])[lbs:]
            onehot = torch.nn.functional.one_hot(
                torch.tensor(batch["mixed_label"]).long()[lbs:], NUM_FINE).permute(0, 3, 1, 2)
            target = torch.zeros(onehot.size(), dtype=torch.float32)
            for i in range(target.size(0)):
                target[i] = (onehot[i] * alpha[i] if pseudo_lf is None
                             else pseudo_lf[i] * (1 - alpha[i]) + onehot[i] * alpha[i])
            with torch.set_grad_enabled(mix_gradient):
                pred = torch_model(params, nchw(batch["mixed_image"])[lbs:])["fine_logit"]
            name = "loss_mix"
        else:
            target, pred, name = pseudo_lf, out["fine_logit"][lbs:], "loss_pseudo"
        terms[name] = 0.5 * (torch_dice(torch.softmax(pred, 1), target, mask=target)
                             + ce(pred, target)) / (1 + math.exp(-it // 1000))
        terms["pseudo_threshold"], terms["ramp_weight"] = threshold, ramp
    total = sum(v for n, v in terms.items() if n.startswith("loss"))
    total.backward()
    grads = {n: p.grad.numpy() for n, p in params.items()}
    values = {n: float(v.detach()) if torch.is_tensor(v) else v for n, v in terms.items()}
    return float(total.detach()), values, grads


def jax_loss_and_grads(params_np, batch, rng, **settings):
    def loss(params):
        return subseg.loss_fn(PixelModel(params), batch, rng, **settings)
    params = jax.tree.map(jnp.asarray, params_np)
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return float(value), {k: float(v) for k, v in metrics.items()}, grads


def key_with_view(view):
    """An rng whose pseudo-label view is `view`, so the reference can take the same one."""
    return next(key for key in map(jax.random.key, range(1000))
                if int(subseg.pseudo_label_view(key)) == view)


MODES = [dict(mix=True, pseudo=True), dict(mix=True, pseudo=False),
         dict(mix=False, pseudo=True), dict(mix=False, pseudo=False)]
MODE_IDS = ["mix_pseudo", "mix_only", "pseudo_only", "plain"]


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("step", [0, 1500, 20000])
@pytest.mark.parametrize("seed,view", [(0, 3), (1, 6), (2, 5)])  # odd k, both flip axes
def test_loss_and_gradients_match_the_official_formulas(mode, step, seed, view):
    params, batch = make_params(seed), make_batch(seed, step)
    rng = key_with_view(view)
    expected, terms, grads = torch_reference(params, batch, view, **mode)
    loss, metrics, jax_grads = jax_loss_and_grads(
        params, batch, rng, hierarchical_mix=mode["mix"], pseudo_labels=mode["pseudo"])
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    for name, value in terms.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not {"loss_mix", "loss_pseudo"} & (set(metrics) - set(terms))
    for name, grad in grads.items():
        np.testing.assert_allclose(np.asarray(jax_grads[name]), grad, rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_pseudo_labels_are_exercised_by_the_parity_data():
    """The parity cases above would be vacuous if no pixel passed the threshold."""
    _, metrics, _ = jax_loss_and_grads(make_params(0), make_batch(0, 20000), jax.random.key(10))
    assert 0.05 < metrics["pseudo_label_fraction"] < 0.95
    _, metrics, _ = jax_loss_and_grads(make_params(0), make_batch(0, 0), jax.random.key(10))
    assert metrics["pseudo_label_fraction"] == 0.0  # tau = 1 at step 0: nothing passes


def test_mix_gradient_false_reproduces_the_official_no_grad_mix():
    params, batch = make_params(3), make_batch(3, 20000)
    rng = jax.random.key(3)
    _, _, grads = torch_reference(params, batch, subseg.pseudo_label_view(rng), mix=True,
                                  pseudo=True, mix_gradient=False)
    _, _, jax_grads = jax_loss_and_grads(params, batch, rng, mix_gradient=False)
    for name, grad in grads.items():
        np.testing.assert_allclose(np.asarray(jax_grads[name]), grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("view", range(subseg.NUM_VIEWS))
def test_views_match_torch_rot90_and_flip(view):
    x = np.random.default_rng(view).normal(size=(2, 5, 5, 3)).astype(np.float32)
    k, flip_axis = subseg.view_params(view)
    expected = torch.flip(torch.rot90(torch.tensor(x).permute(0, 3, 1, 2), k=k, dims=(2, 3)),
                          dims=(flip_axis + 1,)).permute(0, 2, 3, 1).numpy()
    viewed = subseg.apply_view(jnp.asarray(x), view)
    np.testing.assert_array_equal(np.asarray(viewed), expected)
    np.testing.assert_array_equal(np.asarray(subseg.apply_view(viewed, view, inverse=True)), x)


def test_views_are_drawn_from_the_rng_uniformly():
    views = [int(subseg.pseudo_label_view(jax.random.key(i))) for i in range(400)]
    counts = np.bincount(views, minlength=subseg.NUM_VIEWS)
    assert counts.min() > 25 and len(counts) == subseg.NUM_VIEWS
    assert int(subseg.pseudo_label_view(None)) == 0


def test_rows_are_chosen_by_the_flag_not_the_position():
    params, batch = make_params(4), make_batch(4, 20000)
    order = np.array([2, 0, 4, 1, 5, 3])
    shuffled = {k: (v[order] if np.ndim(v) and len(v) == B else v) for k, v in batch.items()}
    rng = jax.random.key(0)
    loss, metrics, _ = jax_loss_and_grads(params, batch, rng)
    loss_shuffled, metrics_shuffled, _ = jax_loss_and_grads(params, shuffled, rng)
    np.testing.assert_allclose(loss_shuffled, loss, rtol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(metrics_shuffled[name], metrics[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- masking
def test_fine_labels_of_unflagged_rows_change_nothing():
    params, batch = make_params(5), make_batch(5, 20000)
    rng = jax.random.key(1)
    loss, metrics, grads = jax_loss_and_grads(params, batch, rng)
    changed = dict(batch, label_fine=batch["label_fine"].copy())
    changed["label_fine"][~batch["has_fine"]] = 3
    loss2, metrics2, grads2 = jax_loss_and_grads(params, changed, rng)
    assert loss2 == loss and metrics2 == metrics
    jax.tree.map(np.testing.assert_array_equal, grads2, grads)


def test_no_fine_flagged_row_gives_a_zero_fine_term():
    batch = make_batch(6, 20000, labelled=0)
    loss, metrics, grads = jax_loss_and_grads(make_params(6), batch, jax.random.key(0))
    assert metrics["loss_fine"] == 0.0 and metrics["accuracy_fine"] == 0.0
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("mode", MODES[:3])
def test_an_all_labelled_batch_gives_coarse_plus_fine(mode):
    batch = make_batch(7, 20000, labelled=B)
    loss, metrics, grads = jax_loss_and_grads(
        make_params(7), batch, jax.random.key(0), hierarchical_mix=mode["mix"],
        pseudo_labels=mode["pseudo"])
    third = "loss_mix" if mode["mix"] else "loss_pseudo"
    assert metrics[third] == 0.0
    np.testing.assert_allclose(loss, metrics["loss_coarse"] + metrics["loss_fine"], rtol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_weights_scale_their_terms():
    params, batch = make_params(8), make_batch(8, 20000)
    rng = jax.random.key(0)
    _, m, _ = jax_loss_and_grads(params, batch, rng)
    loss, _, _ = jax_loss_and_grads(params, batch, rng, coarse_weight=2.0, fine_weight=0.5,
                                    mix_weight=3.0)
    np.testing.assert_allclose(
        loss, 2 * m["loss_coarse"] + 0.5 * m["loss_fine"] + 3 * m["loss_mix"], rtol=1e-6)


# --------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_rule():
    q = np.array([[0.10, 0.70, 0.15, 0.05],    # coarse 1: class 1 passes both views
                  [0.70, 0.10, 0.10, 0.10],    # coarse 1: class 0 confident, wrong superclass
                  [0.10, 0.70, 0.10, 0.10],    # coarse 1: the second view disagrees
                  [0.80, 0.10, 0.05, 0.05],    # coarse 0: background passes
                  [0.10, 0.45, 0.45, 0.00],    # coarse 1: two classes pass tau = 0.4
                  [0.10, 0.50, 0.40, 0.00]],   # coarse 1: 0.4 is not > 0.4
                 np.float32)
    k = q.copy()
    k[2] = [0.10, 0.30, 0.50, 0.10]
    coarse = np.array([1, 1, 1, 0, 1, 1])
    got = subseg.make_pseudo_labels(jnp.asarray(q)[None, None], jnp.asarray(k)[None, None],
                                    jnp.asarray(coarse)[None, None], 0.4, F2C)[0, 0]
    expected = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0],
                         [0, 1, 1, 0], [0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(got), expected)
    reference = torch_pseudo(torch.tensor(q).T[None, :, None], torch.tensor(k).T[None, :, None],
                             torch.tensor(coarse)[None, None], 0.4)
    np.testing.assert_array_equal(reference[0, :, 0].T.numpy(), expected)


def test_no_gradient_flows_through_pseudo_labels():
    """With the pseudo-labels frozen as constants, the gradient is unchanged."""
    params, batch = make_params(9), make_batch(9, 20000)
    rng = jax.random.key(2)
    _, _, grads = jax_loss_and_grads(params, batch, rng, hierarchical_mix=False)

    model = PixelModel(jax.tree.map(jnp.asarray, params))
    q_soft = jax.nn.softmax(model(batch["image"])["fine_logits"])
    view = subseg.pseudo_label_view(rng)
    k_soft = subseg.apply_view(
        jax.nn.softmax(model(subseg.apply_view(batch["image"], view))["fine_logits"]),
        view, inverse=True)
    frozen = np.asarray(subseg.make_pseudo_labels(q_soft, k_soft, batch["label_coarse"],
                                                  subseg.threshold_at(20000), F2C))
    rows = (~batch["has_fine"]).astype(np.float32)[:, None, None]

    def by_hand(p):
        out = PixelModel(p)(batch["image"])
        plain, _ = subseg.loss_fn(PixelModel(p), batch, rng, hierarchical_mix=False,
                                  pseudo_labels=False)
        logits = out["fine_logits"]
        third = 0.5 * (subseg.cross_entropy(logits, frozen, jnp.broadcast_to(rows, (B, S, S)))
                       + subseg.dice_loss(jax.nn.softmax(logits), frozen,
                                          frozen * rows[..., None]))
        return plain + subseg.ramp_at(20000) * third

    expected = jax.grad(by_hand)(jax.tree.map(jnp.asarray, params))
    for name in grads:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected[name]),
                                   rtol=1e-5, atol=1e-7)


def test_mixed_target_definition():
    r = np.random.default_rng(0)
    pseudo = (r.uniform(size=(3, 4, 4, NUM_FINE)) < 0.3).astype(np.float32)
    label = r.integers(0, NUM_FINE, (3, 4, 4)).astype(np.int32)
    alpha = np.array([0.0, 0.7, 1.0], np.float32)
    got = np.asarray(subseg.mixed_targets(jnp.asarray(pseudo), jnp.asarray(label),
                                          jnp.asarray(alpha), NUM_FINE))
    onehot = np.eye(NUM_FINE, dtype=np.float32)[label]
    np.testing.assert_array_equal(got[0], pseudo[0])  # alpha 0: the row's own pseudo-labels
    np.testing.assert_allclose(got[1], 0.3 * pseudo[1] + 0.7 * onehot[1], rtol=1e-6)
    np.testing.assert_array_equal(got[2], onehot[2])  # background included where not pasted
    without = np.asarray(subseg.mixed_targets(None, jnp.asarray(label), jnp.asarray(alpha),
                                              NUM_FINE))
    np.testing.assert_allclose(without, alpha[:, None, None, None] * onehot, rtol=1e-6)


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("step", [0, 1, 9, 10, 11, 100, 511, 915, 916, 2000, 9999, 10**6])
def test_threshold_schedule(step):
    expected = max(0.999 ** (step // 10), 0.4)
    np.testing.assert_allclose(float(subseg.threshold_at(step)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(subseg.threshold_at(step, decay=0.99, every=3, floor=0.1)),
                               max(0.99 ** (step // 3), 0.1), rtol=1e-5)


@pytest.mark.parametrize("step", [0, 1, 500, 999, 1000, 1001, 1999, 2000, 2500, 10**5])
def test_ramp_is_the_official_arithmetic(step):
    official = 1 / (1 + math.exp(-step // 1000))  # exactly as train_branched.py writes it
    np.testing.assert_allclose(float(subseg.ramp_at(step)), official, rtol=1e-6)
    np.testing.assert_allclose(float(subseg.ramp_at(step, length=250)),
                               1 / (1 + math.exp(-step // 250)), rtol=1e-6)


def test_ramp_differs_from_the_issue_formula_between_multiples():
    issue = lambda step: 1 / (1 + math.exp(-math.floor(step / 1000)))
    assert float(subseg.ramp_at(0)) == pytest.approx(0.5) == issue(0)
    assert float(subseg.ramp_at(1)) == pytest.approx(1 / (1 + math.exp(-1)))  # ceil(1/1000)
    assert issue(1) == 0.5
    assert float(subseg.ramp_at(1500)) == pytest.approx(1 / (1 + math.exp(-2)))
    assert issue(1500) == pytest.approx(1 / (1 + math.exp(-1)))
    for step in (1000, 3000):
        assert float(subseg.ramp_at(step)) == pytest.approx(issue(step))


# --------------------------------------------------------------------------- jit, nnx
class TinySegmenter(nnx.Module):
    """Conv -> batch norm -> dropout -> two 1x1 heads; batch statistics and dropout only
    with an rng, as the segmentation models do."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(C, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.coarse = nnx.Conv(8, NUM_COARSE, (1, 1), rngs=rngs)
        self.fine = nnx.Conv(8, NUM_FINE, (1, 1), rngs=rngs)

    def __call__(self, images, rng=None):
        h = nnx.relu(self.norm(self.conv(images), use_running_average=rng is None))
        if rng is not None:
            h = conv_blocks.dropout(h, 0.1, rng)  # one key per example (models.example_rng)
        return {"coarse_logits": self.coarse(h), "fine_logits": self.fine(h)}


def test_jit_and_finite_gradient_through_a_tiny_nnx_model():
    """As the trainer does it: pure-dict parameters and batch statistics bound inside
    the jitted function, the updated statistics read back out."""
    graphdef, param_state, stat_state = nnx.split(TinySegmenter(rngs=nnx.Rngs(0)), nnx.Param,
                                                  nnx.BatchStat)
    params, stats = nnx.to_pure_dict(param_state), nnx.to_pure_dict(stat_state)
    loss_fn = build_loss_fn({"subclass_segmentation": {"weight": 1.0, "fine_to_coarse": F2C}})

    def objective(params, stats, batch, rng):
        bound = []
        for template, values in ((param_state, params), (stat_state, stats)):
            state = jax.tree.map(lambda x: x, template)
            nnx.replace_by_pure_dict(state, values)
            bound.append(state)
        model = nnx.merge(graphdef, *bound)
        loss, metrics = loss_fn(model, batch, rng)
        return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    batch = {k: jnp.asarray(v) for k, v in make_batch(11, 20000).items()}
    (loss, (metrics, new_stats)), grads = step(params, stats, batch, jax.random.key(0))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))
    assert set(metrics) == {"loss_coarse", "loss_fine", "loss_mix", "pseudo_threshold",
                            "ramp_weight", "pseudo_label_fraction", "accuracy_fine",
                            "accuracy_coarse"}
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         new_stats, stats)
    assert any(jax.tree.leaves(moved)), "training forwards update the running statistics"
    eager, _ = objective(params, stats, batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-5)


def test_metric_names_per_mode():
    params, batch = make_params(0), make_batch(0)
    base = {"loss_coarse", "loss_fine", "accuracy_fine", "accuracy_coarse"}
    schedule = {"pseudo_threshold", "ramp_weight"}
    for mix, pseudo, extra in [(True, True, {"loss_mix", "pseudo_label_fraction"}),
                               (True, False, {"loss_mix"}),
                               (False, True, {"loss_pseudo", "pseudo_label_fraction"})]:
        _, metrics, _ = jax_loss_and_grads(params, batch, jax.random.key(0),
                                           hierarchical_mix=mix, pseudo_labels=pseudo)
        assert set(metrics) == base | schedule | extra
    plain = dict(batch)
    for key in ("mixed_image", "mixed_label", "mix_alpha", "step"):
        plain.pop(key)
    _, metrics, _ = jax_loss_and_grads(params, plain, jax.random.key(0),
                                       hierarchical_mix=False, pseudo_labels=False)
    assert set(metrics) == base


# --------------------------------------------------------------------------- errors
def test_clear_errors():
    params, batch = make_params(0), make_batch(0)
    model = PixelModel(params)
    no_mix = {k: v for k, v in batch.items() if k != "mixed_image"}
    with pytest.raises(ValueError, match=r"lacks \['mixed_image'\].*hierarchical_mix=False"):
        subseg.loss_fn(model, no_mix, None)
    with pytest.raises(ValueError, match="no 'step'"):
        subseg.loss_fn(model, {k: v for k, v in batch.items() if k != "step"}, None)
    with pytest.raises(ValueError, match="5 fine classes|names 5"):
        subseg.loss_fn(model, batch, None, fine_to_coarse=(0, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="implies 3"):
        subseg.loss_fn(model, batch, None, fine_to_coarse=(0, 1, 2, 2))
    with pytest.raises(ValueError, match="background"):
        subseg.loss_fn(model, batch, None, fine_to_coarse=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="ramp_length"):
        subseg.loss_fn(model, batch, None, ramp_length=0)
    wide = dict(batch, image=np.zeros((B, S, S + 2, C), np.float32))
    with pytest.raises(ValueError, match="square"):
        subseg.loss_fn(model, wide, None)
