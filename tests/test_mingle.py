"""MINGLE's pieces on tiny layers where the answer is known (docs/methods.md, MINGLE).

Every test but the last two runs in well under a second: tiny matrices and a 2-block, width-16 open_clip
ViT. The last two run MINGLE end to end on the quick demo zoo (the `quick_zoo` session fixture).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.methods.mingle import (GatedLinear, Mingle, MingleConfig, MingleEncoder, SplitQKVAttention,
                                   accumulate_basis, distillation_loss, effective_rank, low_rank_expert,
                                   project_out_previous, relaxed_projection, top_subspace)

torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only waits on a shared CPU

TINY_VIT = dict(image_size=8, patch_size=4, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=8)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ---- expert construction -----------------------------------------------------------------

@pytest.mark.fast
def test_effective_rank_is_floor_exp_entropy():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4  # flat spectrum: exp(log 4) = 4
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == 1  # zeros do not give NaN (xlogy)
    assert effective_rank(torch.zeros(3)) == 0
    s = torch.tensor([3.0, 2.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == math.floor(math.exp(float(-(p * p.log()).sum())))


@pytest.mark.fast
def test_projection_removes_exactly_the_rho_by_rho_block():
    # Previous experts' sum with singular values (1, 1, 0, 0, ...) -> ρ = 2 (flat on two directions).
    d_out, d_in = 6, 5
    u, v = _orthonormal(d_out, d_out, 0), _orthonormal(d_in, d_in, 1)
    s = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    previous = u[:, :5] @ torch.diag(s) @ v.T
    assert effective_rank(torch.linalg.svdvals(previous)) == 2
    delta = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    projected = project_out_previous(delta, previous)
    # In the previous SVD's bases, only the top-left 2x2 block is zeroed; everything else (the
    # diagonal beyond it included: the official `.diag().fill_(0)` is a no-op) is untouched.
    c_before, c_after = u.T @ delta @ v, u.T @ projected @ v
    assert torch.allclose(c_after[:2, :2], torch.zeros(2, 2, dtype=torch.float64), atol=1e-12)
    mask = torch.ones_like(c_before, dtype=torch.bool)
    mask[:2, :2] = False
    assert torch.allclose(c_after[mask], c_before[mask], atol=1e-12)


@pytest.mark.fast
def test_projection_is_a_no_op_for_the_first_task():
    delta = torch.randn(4, 3)
    assert torch.equal(project_out_previous(delta, None), delta)


@pytest.mark.fast
def test_expert_factors_are_the_rank_r_truncation():
    delta = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b, a = low_rank_expert(delta, 2)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert b.shape == (7, 2) and a.shape == (2, 5)
    assert torch.allclose(b.T @ b, torch.eye(2, dtype=torch.float64), atol=1e-12)  # B = U_r orthonormal
    assert torch.allclose(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-12)  # Eckart–Young truncation
    b_full, a_full = low_rank_expert(delta, 64)  # r above min(d_out, d_in) is capped: exact
    assert b_full.shape == (7, 5) and torch.allclose(b_full @ a_full, delta, atol=1e-12)


# ---- gradient projection and relaxation ------------------------------------------------

@pytest.mark.fast
def test_hard_projection_gradient_is_orthogonal_to_the_stored_subspace():
    basis = _orthonormal(8, 3, 4).float()
    grad = torch.randn(1, 8, generator=torch.Generator().manual_seed(5))
    projected, score = relaxed_projection(grad, basis, torch.zeros(3), beta=0.99, gamma=0.0)
    assert torch.allclose(projected @ basis, torch.zeros(1, 3), atol=1e-6)
    # The EMA still runs at γ = 0 (it just has no effect): S = (1 − β) r on the first step.
    r = (grad @ basis).abs()[0] / grad.norm()
    assert torch.allclose(score, 0.01 * r, atol=1e-7)


@pytest.mark.fast
def test_relaxation_factors_follow_exp_minus_gamma_s():
    basis = _orthonormal(6, 2, 6).float()
    grad = torch.randn(1, 6, generator=torch.Generator().manual_seed(7))
    beta, gamma = 0.9, 3.0
    previous = torch.tensor([0.2, 0.5])
    projected, score = relaxed_projection(grad, basis, previous, beta=beta, gamma=gamma)
    r = (grad @ basis).abs()[0] / (grad.norm() + 1e-12)  # alignment of the *un-projected* gradient
    expected_score = beta * previous + (1 - beta) * r  # EMA updated before λ is formed
    assert torch.allclose(score, expected_score, atol=1e-7)
    lam = torch.exp(-gamma * expected_score)
    # Along each protected direction p the component is scaled by (1 − λ_p); off the subspace untouched.
    assert torch.allclose(projected @ basis, (grad @ basis) * (1 - lam), atol=1e-6)
    off = grad - (grad @ basis) @ basis.T
    assert torch.allclose(projected - (projected @ basis) @ basis.T, off, atol=1e-6)


@pytest.mark.fast
def test_no_subspace_means_no_projection():
    grad = torch.randn(1, 5)
    out, score = relaxed_projection(grad, torch.zeros(5, 0), torch.zeros(0), beta=0.99, gamma=1.0)
    assert torch.equal(out, grad) and score.numel() == 0


@pytest.mark.fast
def test_subspace_is_top_k_of_the_second_moment_and_accumulates_by_qr():
    directions = _orthonormal(6, 6, 8).float()
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(9)) * torch.tensor([5.0, 4.0, 3.0, 0.1, 0.1, 0.1])
    x = x @ directions.T
    top = top_subspace(x.T @ x, 3)
    # The top-3 span is the span of the first three (high-variance) directions.
    assert torch.allclose(top @ top.T, directions[:, :3] @ directions[:, :3].T, atol=0.05)
    basis = accumulate_basis(torch.zeros(6, 0), top)
    basis = accumulate_basis(basis, directions[:, 2:5])  # overlaps on one direction
    assert basis.shape == (6, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-5)
    capped = accumulate_basis(basis, directions[:, :2])  # never more than d_in columns
    assert capped.shape == (6, 6)


@pytest.mark.fast
def test_top_subspace_equals_the_svds_top_singular_vectors_and_k_zero_is_empty():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x * torch.linspace(3.0, 0.5, 12, dtype=torch.float64)  # distinct variances: a well-defined top-k
    moment = x.T @ x
    u, _, _ = torch.linalg.svd(moment)
    for k in (1, 3, 12):
        top = top_subspace(moment, k)
        assert top.shape == (12, k)
        assert torch.allclose(top @ top.T, u[:, :k] @ u[:, :k].T, atol=1e-10)
        assert torch.allclose(top.T @ top, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert top_subspace(moment, 0).shape == (12, 0)
    assert top_subspace(moment, 50).shape == (12, 12)  # capped at d_in


@pytest.mark.fast
def test_svd_of_product_and_factored_projection_equal_the_dense_ones():
    from engine.methods.mingle import svd_of_product

    gen = torch.Generator().manual_seed(11)
    for m, n, q in ((9, 7, 4), (5, 8, 6), (6, 6, 12)):  # thin, wide, and more columns than rows
        b = torch.randn(m, q, generator=gen, dtype=torch.float64)
        a = torch.randn(q, n, generator=gen, dtype=torch.float64)
        u, s, vh = svd_of_product(b, a)
        dense_s = torch.linalg.svdvals(b @ a)
        assert torch.allclose(u @ torch.diag(s) @ vh, b @ a, atol=1e-10)
        assert torch.allclose(s[: min(len(s), len(dense_s))], dense_s[: min(len(s), len(dense_s))], atol=1e-10)
        delta = torch.randn(m, n, generator=gen, dtype=torch.float64)
        assert torch.allclose(project_out_previous(delta, None, factors=(b, a)), project_out_previous(delta, b @ a),
                              atol=1e-10)


@pytest.mark.fast
def test_gated_linear_expert_factors_multiply_to_the_expert_sum():
    gen = torch.Generator().manual_seed(2)
    layer = GatedLinear(torch.randn(5, 4, generator=gen), None)
    assert layer.expert_factors() is None
    for _ in range(3):
        layer.add_expert(torch.randn(5, 2, generator=gen), torch.randn(2, 4, generator=gen), generator=gen)
    b_all, a_all = layer.expert_factors()
    assert b_all.shape == (5, 6) and a_all.shape == (6, 4)
    assert torch.allclose(b_all @ a_all, layer.expert_sum(), atol=1e-6)


@pytest.mark.fast
def test_distillation_loss_is_soft_target_cross_entropy_without_t_squared():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    loss = distillation_loss(student, teacher, 2.0)
    p = torch.softmax(teacher / 2, -1)
    assert torch.allclose(loss, -(p * torch.log_softmax(student / 2, -1)).sum(-1).mean())


# ---- gated forward pass -------------------------------------------------------------------

@pytest.mark.fast
def test_gated_linear_adds_gate_weighted_experts_to_w0():
    torch.manual_seed(0)
    w0, b0 = torch.randn(3, 4), torch.randn(3)
    layer = GatedLinear(w0, b0)
    x = torch.randn(2, 5, 4)
    assert torch.allclose(layer(x), x @ w0.T + b0)
    b1, a1 = low_rank_expert(torch.randn(3, 4), 2)
    layer.add_expert(b1, a1, init_std=0.0)
    with torch.no_grad():
        layer.gate_w.copy_(torch.randn(1, 4))
        layer.gate_b.fill_(0.5)
    g = (x.reshape(-1, 4).mean(0) @ layer.gate_w.T + layer.gate_b)[0]  # averaged over tokens and batch
    assert torch.allclose(layer(x), x @ (w0 + g * b1 @ a1).T + b0, atol=1e-6)
    # A second expert freezes the first gate; only the newest gate is a Parameter.
    b2, a2 = low_rank_expert(torch.randn(3, 4), 2)
    first_gate = layer.gate_w.detach().clone()
    layer.add_expert(b2, a2, init_std=0.0)
    assert torch.equal(layer.frozen_w, first_gate) and [n for n, _ in layer.named_parameters()] == ["gate_w", "gate_b"]
    # Per-image routing: each image's own token mean.
    layer.batch_reduce = False
    gates = layer.gate_values(x.mean(1))  # (N, 2)
    expected = torch.stack([x[n] @ (w0 + gates[n, 0] * b1 @ a1 + gates[n, 1] * b2 @ a2).T + b0 for n in range(2)])
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.fast
def test_split_qkv_attention_matches_multihead_attention():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    split = SplitQKVAttention.from_multihead(mha)
    x = torch.randn(3, 7, 16)
    expected = mha(x, x, x, need_weights=False)[0]
    assert torch.allclose(split(x, x, x, need_weights=False)[0], expected, atol=1e-5)


def _tiny_vit():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(2)
    return VisionTransformer(**TINY_VIT).eval()


@pytest.mark.fast
def test_wrapped_vit_with_zero_gates_equals_the_original():
    import copy

    visual = _tiny_vit()
    images = torch.randn(4, 3, 8, 8)
    expected = visual(images)
    encoder = MingleEncoder(copy.deepcopy(visual), "all")
    assert torch.allclose(encoder(images), expected, atol=1e-5)
    # Experts with all gates at exactly 0 leave the function unchanged.
    for layer in encoder.gated():
        b, a = low_rank_expert(torch.randn(layer.out_features, layer.in_features), 4)
        layer.add_expert(b, a, init_std=0.0)
    assert torch.allclose(encoder(images), expected, atol=1e-5)
    assert len(encoder.selected) == 12 and len(MingleEncoder(copy.deepcopy(visual), "qkv-fc1").selected) == 8


# ---- one continual run on the tiny ViT ---------------------------------------------------------

def _state(visual) -> dict[str, torch.Tensor]:
    from engine.checkpoints import open_clip_to_canonical

    return open_clip_to_canonical({k: v.detach().clone() for k, v in visual.state_dict().items()})[0]


def _finetuned(theta0, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in theta0.items()}


@pytest.mark.fast
def test_two_tasks_train_only_the_newest_gate_and_keep_theta0_elsewhere():
    theta0 = _state(_tiny_vit())
    heads = [torch.randn(8, 4, generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    config = MingleConfig(rank=4, steps=5, batch_size=4, gamma=0.0, lr=1e-2)
    mingle = Mingle(TINY_VIT, config)
    mingle.init(theta0)
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    mingle.step("a", _finetuned(theta0, 20), images, lambda f: 100 * f @ heads[0])
    layer = mingle.encoder.linears["encoder.layers.0.mlp.fc1"]
    first_gate = layer.gate_w.detach().clone()
    assert mingle.bases["encoder.layers.0.mlp.fc1"].shape == (16, 3)
    mingle.step("b", _finetuned(theta0, 21), images, lambda f: 100 * f @ heads[1])
    assert torch.equal(layer.frozen_w[0], first_gate[0])  # the old gate never moved
    assert layer.num_experts == 2 and mingle.bases["encoder.layers.0.mlp.fc1"].shape == (16, 6)
    # Biases and LayerNorms stay at θ_0 (docs/methods.md, MINGLE).
    assert torch.equal(layer.bias, theta0["encoder.layers.0.mlp.fc1.bias"])
    assert torch.equal(mingle.encoder.visual.ln_pre.weight, theta0["pre_layrnorm.weight"])
    assert len(mingle.logs[-1].losses) == 5


@pytest.mark.fast
def test_hard_projection_keeps_the_new_gate_orthogonal_to_the_protected_inputs_with_sgd_like_steps():
    # With γ = 0, Adam's per-coordinate rescaling breaks exact orthogonality (docs/methods.md, MINGLE), but the
    # *gradient* handed to the optimiser is orthogonal: check it by hooking the projection.
    theta0 = _state(_tiny_vit())
    head = torch.randn(8, 4, generator=torch.Generator().manual_seed(30))
    mingle = Mingle(TINY_VIT, MingleConfig(rank=4, steps=2, batch_size=4, gamma=0.0))
    mingle.init(theta0)
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(31))
    mingle.step("a", _finetuned(theta0, 32), images, lambda f: 100 * f @ head)
    seen = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        for name, layer in zip(mingle.encoder.selected, mingle.encoder.gated()):
            seen.append(float((layer.gate_w.grad @ mingle.bases[name]).abs().max()))
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        mingle.step("b", _finetuned(theta0, 33), images, lambda f: 100 * f @ head)
    finally:
        torch.optim.Adam.step = original
    assert seen and max(seen) < 1e-6


@pytest.mark.fast
def test_static_variant_uses_a_fixed_coefficient():
    theta0 = _state(_tiny_vit())
    mingle = Mingle(TINY_VIT, MingleConfig(rank=64, static=True, static_coef=0.3))
    mingle.init(theta0)
    theta1 = _finetuned(theta0, 40)
    encoder = mingle.step("a", theta1, torch.randn(4, 3, 8, 8), lambda f: f)
    # Full rank, one task: every selected W is W0 + 0.3 (W1 − W0); all else at θ0.
    from engine.methods.mingle import build_encoder

    expected_state = dict(theta0)
    for name in encoder.selected:
        key = f"{name}.weight"
        expected_state[key] = theta0[key] + 0.3 * (theta1[key] - theta0[key])
    images = torch.randn(3, 3, 8, 8)
    assert torch.allclose(encoder(images), build_encoder(TINY_VIT, expected_state)(images), atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("bad", [dict(gamma=-1.0), dict(layers="fc3"), dict(rank=0)])
def test_config_is_validated(bad):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError):
        Mingle(TINY_VIT, MingleConfig(**bad))


@pytest.mark.fast
def test_an_encoder_factory_and_vit_kwargs_give_the_same_run():
    """`Mingle(encoder, ...)` takes a suite's `build_encoder` (state -> encoder) or VisionTransformer kwargs:
    both build the same plain encoders (θ_0 to wrap, θ_t as teacher), so every number agrees bit for bit."""
    from engine.methods.mingle import build_encoder, encoder_factory

    theta0 = _state(_tiny_vit())
    built = []

    def factory(state):
        built.append(state)
        return build_encoder(TINY_VIT, state)

    assert encoder_factory(factory) is factory
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(50))
    head = torch.randn(8, 4, generator=torch.Generator().manual_seed(51))
    outputs = []
    for encoder in (TINY_VIT, factory):
        torch.manual_seed(0)
        mingle = Mingle(encoder, MingleConfig(rank=4, steps=3, batch_size=4))
        mingle.init(theta0)
        for task, seed in (("a", 52), ("b", 53)):
            merged = mingle.step(task, _finetuned(theta0, seed), images, lambda f: 100 * f @ head)
        with torch.no_grad():
            outputs.append(merged(images))
    assert torch.equal(outputs[0], outputs[1])
    assert len(built) == 3  # θ_0 once, then one teacher per task
    assert all(torch.equal(built[0][k], theta0[k]) for k in theta0)
    with torch.no_grad():
        plain = encoder_factory(TINY_VIT)(theta0)
        wrapped = MingleEncoder.from_state_dict(factory, theta0)  # split q/k/v: the same function up to round-off
        assert torch.allclose(wrapped(images), plain(images), atol=1e-5)


@pytest.mark.fast
def test_gate_activations_average_raw_gate_outputs_over_tokens_and_images():
    import copy

    from engine.analysis.gates import gate_activations

    encoder = MingleEncoder(copy.deepcopy(_tiny_vit()), "qkv-fc1")
    for _ in range(2):
        for layer in encoder.gated():
            b, a = low_rank_expert(torch.randn(layer.out_features, layer.in_features), 4)
            layer.add_expert(b, a, init_std=0.5)
    images = {"x": torch.randn(5, 3, 8, 8), "y": torch.randn(3, 3, 8, 8)}
    stats = gate_activations(encoder, images, gate_tasks=["x", "y"], batch_size=2)
    assert stats.per_layer.shape == (8, 2, 2) and stats.mean.shape == (2, 2)
    # By hand for one layer: its inputs under the same batching, every token's raw gate values, averaged.
    layer = encoder.linears["encoder.layers.1.mlp.fc1"]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for start in range(0, 5, 2):
            encoder(images["x"][start:start + 2])
    handle.remove()
    expected = layer.gate_values(torch.cat(seen)).mean(0).detach()
    row = stats.layers.index("encoder.layers.1.mlp.fc1")
    assert torch.allclose(torch.as_tensor(stats.per_layer[row, :, 0]).float(), expected, atol=1e-5)
    assert stats.std.shape == (2, 2) and (stats.std >= 0).all()


# ---- end to end on the real (quick) zoo -------------------------------------------------------------


def test_cli_mingle_on_the_quick_zoo(quick_zoo):
    """`python -m engine continual --zoo DIR --method mingle --json`, a few adaptation steps per task."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine.continual import task_order

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "engine", "continual", "--zoo", str(quick_zoo.root), "--method",
                          "mingle", "--steps", "3", "--rank", "8", "--seeds-per-class", "2", "--json"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    tasks = quick_zoo.task_names()
    n, blocks = len(tasks), quick_zoo.model_config["kwargs"]["layers"]
    assert payload["order"] == task_order(tasks, 42) and payload["config"]["rank"] == 8
    m = payload["acc_matrix"]
    assert all((m[i][j] is None) == (j > i) for i in range(n) for j in range(n))
    assert all(0 <= m[i][j] <= 100 for i in range(n) for j in range(i + 1))
    assert payload["BWT"] is not None and payload["FWT"] is not None
    assert len(payload["timings"]["merge_s"]) == n and payload["timings"]["merge_total_s"] > 0
    gates = payload["gates"]
    assert gates["gate_tasks"] == payload["order"] and gates["eval_tasks"] == payload["order"]
    assert len(gates["layers"]) == 6 * blocks  # q, k, v, out_proj, fc1, fc2 per block
    assert len(gates["mean"]) == n and all(len(row) == n for row in gates["mean"]) and len(gates["std"]) == n
    assert set(gates["per_layer"]) == set(gates["layers"])


def test_mingle_static_qkv_fc1_on_the_quick_zoo(quick_zoo, quick_suite):
    """MINGLE*-static in-process: no adaptation, gates fixed; the first step already differs from θ_0."""
    from engine.continual import make_method, run_continual

    config = MingleConfig(rank=8, layers="qkv-fc1", static=True)
    result = run_continual(quick_suite, make_method("mingle", config, quick_suite.build_encoder),
                           quick_suite.tasks[:2], seeds_per_class=1)
    assert result.config["static"] and len(result.acc_matrix) == 2 and result.acc_matrix[1][1] is not None
    # the suite's encoder factory and the manifest's VisionTransformer kwargs build the same MINGLE model
    by_kwargs = run_continual(quick_suite, make_method("mingle", config, quick_zoo.model_config["kwargs"]),
                              quick_suite.tasks[:2], seeds_per_class=1)
    assert by_kwargs.acc_matrix == result.acc_matrix
