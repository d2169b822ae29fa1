"""BAKE maths against independent float64 references, hand-derived values and properties."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from bake_ray.core.bake import (
    BakeLoss,
    LossParts,
    affinity,
    build_loss,
    choose_solver,
    distillation_loss,
    global_soft_targets,
    neumann_steps,
    propagate,
    propagate_neumann,
    soft_targets,
)

FIXTURE = Path(__file__).parent / "fixtures" / "bake_reference.json"


# ------------------------------------------------------------------ float64 numpy reference


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def numpy_affinity(features: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Element by element: A_ij = exp(cos_ij/tau) / sum_{k != i} exp(cos_ik/tau), A_ii = 0.

    tau = 1 is the paper's affinity; the largest cosine is subtracted in each row first
    (which leaves the ratio unchanged) so a small tau cannot overflow exp.
    """
    b = features.shape[0]
    norms = np.sqrt((features**2).sum(axis=1))
    a = np.zeros((b, b))
    for i in range(b):
        cos = [features[i] @ features[j] / (norms[i] * norms[j]) for j in range(b)]
        top = max(cos[k] for k in range(b) if k != i) if tau != 1.0 else 0.0
        denom = sum(np.exp((cos[k] - top) / tau) for k in range(b) if k != i)
        for j in range(b):
            a[i, j] = 0.0 if i == j else np.exp((cos[j] - top) / tau) / denom
    return a


def numpy_targets_by_iteration(features, logits, omega, temperature, steps=2000, tau=1.0):
    """Q as the fixed point of Q <- omega A Q + (1 - omega) P (no matrix inverse involved)."""
    p = numpy_softmax(logits / temperature)
    a = numpy_affinity(features, tau)
    q = p.copy()
    for _ in range(steps):
        q = omega * a @ q + (1 - omega) * p
    return q


def numpy_kd(logits, targets, temperature):
    log_p = np.log(numpy_softmax(logits / temperature))
    kl = (targets * (np.log(targets) - log_p)).sum(axis=1)
    return temperature**2 * kl.mean()


def random_batch(b: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)), 3.0 * rng.normal(size=(b, c))


# ------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("b", "omega", "temperature"),
    [
        (2, 0.5, 4.0),
        (3, 0.9, 1.0),
        (16, 0.5, 4.0),
        (64, 0.7, 2.0),
        (256, 0.5, 4.0),
        (8, 0.5, 100.0),
    ],
)
def test_soft_targets_match_float64_iteration(b, omega, temperature):
    features, logits = random_batch(b, 12, 7, seed=b)
    expected = numpy_targets_by_iteration(features, logits, omega, temperature)
    got = soft_targets(torch.from_numpy(features), torch.from_numpy(logits), omega, temperature)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_two_images_match_hand_derivation():
    """B=2: A = [[0,1],[1,0]], so Q_0 = (P_0 + omega P_1) / (1 + omega)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.float64)
    features = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64)
    omega, t = 0.5, 4.0
    p = torch.softmax(logits / t, dim=1)
    expected = torch.stack(
        [(p[0] + omega * p[1]) / (1 + omega), (p[1] + omega * p[0]) / (1 + omega)]
    )
    torch.testing.assert_close(
        soft_targets(features, logits, omega, t), expected, rtol=0, atol=1e-15
    )


def test_distillation_loss_matches_float64_reference():
    features, logits = random_batch(32, 8, 10, seed=3)
    q = numpy_targets_by_iteration(features, logits, 0.5, 4.0)
    got = distillation_loss(torch.from_numpy(logits), torch.from_numpy(q), 4.0)
    assert got.item() == pytest.approx(numpy_kd(logits, q, 4.0), abs=1e-12)


def test_against_stored_fixture():
    """Pre-computed float64 values (see tests/fixtures/make_bake_reference.py) guard regressions."""
    ref = json.loads(FIXTURE.read_text())
    features = torch.tensor(ref["features"], dtype=torch.float64)
    logits = torch.tensor(ref["logits"], dtype=torch.float64)
    q = soft_targets(features, logits, ref["omega"], ref["temperature"])
    np.testing.assert_allclose(q.numpy(), np.array(ref["targets"]), rtol=0, atol=1e-12)
    kd = distillation_loss(logits, q, ref["temperature"])
    assert kd.item() == pytest.approx(ref["kd"], abs=1e-12)


def test_float32_inputs_close_to_float64():
    features, logits = random_batch(128, 32, 100, seed=5)
    exact = numpy_targets_by_iteration(features, logits, 0.5, 4.0)
    got = soft_targets(
        torch.from_numpy(features).float(), torch.from_numpy(logits).float(), 0.5, 4.0
    )
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), exact, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_ensembled_in_float32(dtype):
    features, logits = random_batch(64, 16, 10, seed=6)
    f_half, z_half = torch.from_numpy(features).to(dtype), torch.from_numpy(logits).to(dtype)
    got = soft_targets(f_half, z_half, 0.5, 4.0)
    assert got.dtype == torch.float32
    # The reference sees the same rounded inputs, so only float32 arithmetic error remains.
    exact = numpy_targets_by_iteration(f_half.double().numpy(), z_half.double().numpy(), 0.5, 4.0)
    np.testing.assert_allclose(got.numpy(), exact, atol=2e-6)
    loss = BakeLoss()(f_half, z_half, torch.zeros(64, dtype=torch.long))
    assert torch.isfinite(loss.total) and loss.kd.dtype == torch.float32


# ------------------------------------------------------------------ solvers


def max_row_l1(difference: np.ndarray) -> float:
    """max_i sum_c |x_ic|: the norm of the solvers' error bound."""
    return float(np.abs(difference).sum(axis=1).max())


@pytest.mark.parametrize("solver", ["solve", "neumann", "auto"])
@pytest.mark.parametrize(
    ("b", "c", "omega", "tol"),
    [(64, 7, 0.5, 1e-6), (48, 5, 0.9, 1e-3), (300, 2, 0.5, 1e-4), (40, 10, 0.7, 0.5)],
)
def test_each_solver_is_within_its_bound_of_the_float64_reference(solver, b, c, omega, tol):
    """solve: exact (1e-12); neumann and auto: row-L1 error <= tol, as proven in bake.py."""
    features, logits = random_batch(b, 12, c, seed=b + c)
    expected = numpy_targets_by_iteration(features, logits, omega, 4.0)
    got = soft_targets(
        torch.from_numpy(features), torch.from_numpy(logits), omega, 4.0, solver=solver, tol=tol
    ).numpy()
    used = choose_solver(b, c, omega, tol) if solver == "auto" else solver
    bound = 1e-12 if used == "solve" else tol + 1e-12
    assert max_row_l1(got - expected) <= bound
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)  # still distributions
    if used == "neumann" and tol >= 0.1:  # k = 3 rounds: truncated, not the solve in disguise
        assert max_row_l1(got - expected) > 1e-12


def test_auto_takes_neumann_only_where_it_needs_fewer_flops():
    assert choose_solver(300, 2, 0.5, 1e-4) == "neumann"  # k=14: 28 < 300/3 + 2
    assert choose_solver(64, 7, 0.5, 1e-6) == "solve"
    # default tol 1e-6, omega 0.5 (k = 20): neumann from B > 3 C (k - 1) = 57 C
    assert [choose_solver(b, 100, 0.5, 1e-6) for b in (5700, 5701)] == ["solve", "neumann"]
    assert choose_solver(8192, 1000, 0.5, 1e-6) == "solve"
    assert choose_solver(8192, 100, 0.9, 1e-6) == "solve"  # omega 0.9 needs k = 137


def test_neumann_steps_is_the_smallest_k_of_the_bound():
    assert neumann_steps(0.5, 1e-4) == 14  # 2*0.5**15 = 6.1e-5 <= 1e-4 < 2*0.5**14
    assert neumann_steps(0.0, 1e-4) == 0
    assert (neumann_steps(0.5, 1e-6), neumann_steps(0.9, 1e-6)) == (20, 137)
    for omega in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        for tol in (0.5, 1e-2, 1e-4, 1e-6, 1e-9):
            k = neumann_steps(omega, tol)
            assert 2 * omega ** (k + 1) <= tol and (k == 0 or 2 * omega**k > tol)
    with pytest.raises(ValueError):
        neumann_steps(1.0, 1e-4)


def test_iterative_propagation_meets_its_bound():
    """Every k (not only the one the tolerance picks) obeys 2 omega^(k+1), rows sum to 1."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    probs = torch.softmax(torch.randn(40, 5, generator=generator, dtype=torch.float64), dim=1)
    a, omega = affinity(features), 0.7
    exact = propagate(a, probs, omega)
    for k in range(12):
        approx = propagate_neumann(a, probs, omega, k)
        assert max_row_l1((approx - exact).numpy()) <= 2 * omega ** (k + 1) + 1e-12
        assert torch.allclose(approx.sum(dim=1), torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize(("solver", "tol"), [("fast", 1e-4), ("neumann", 0.0), ("auto", 1.0)])
def test_invalid_solver_or_tolerance_rejected(solver, tol):
    with pytest.raises(ValueError, match=r"solver|tol"):
        soft_targets(torch.randn(4, 3), torch.randn(4, 2), 0.5, 4.0, solver=solver, tol=tol)


# ------------------------------------------------------------------ affinity temperature (tau)
# bake.affinity_temperature goes beyond the paper; tau = 1 must be the paper exactly.


@pytest.mark.parametrize("solver", ["solve", "neumann", "auto"])
@pytest.mark.parametrize(("b", "omega", "tau"), [(16, 0.5, 0.1), (40, 0.9, 0.5), (12, 0.7, 3.0)])
def test_tau_targets_match_float64_reference(solver, b, omega, tau):
    """Every solver with tau != 1 against the float64 fixed point of the tau-affinity."""
    features, logits = random_batch(b, 12, 7, seed=100 + b)
    expected = numpy_targets_by_iteration(features, logits, omega, 4.0, tau=tau)
    tol = 1e-9
    got = soft_targets(
        torch.from_numpy(features), torch.from_numpy(logits), omega, 4.0, solver, tol, tau
    ).numpy()
    assert max_row_l1(got - expected) <= tol + 1e-12
    paper = numpy_targets_by_iteration(features, logits, omega, 4.0)
    assert max_row_l1(got - paper) > 1e-4  # tau really changed the targets


def test_tau_affinity_matches_float64_reference():
    features, _ = random_batch(10, 6, 2, seed=11)
    for tau in (0.05, 0.3, 1.0, 7.0):
        got = affinity(torch.from_numpy(features), tau).numpy()
        np.testing.assert_allclose(got, numpy_affinity(features, tau), rtol=0, atol=1e-13)


def test_tau_one_is_the_paper_exactly():
    """The default and an explicit tau=1.0 give the stored paper reference, bit for bit."""
    ref = json.loads(FIXTURE.read_text())
    features = torch.tensor(ref["features"], dtype=torch.float64)
    logits = torch.tensor(ref["logits"], dtype=torch.float64)
    default = soft_targets(features, logits, ref["omega"], ref["temperature"])
    explicit = soft_targets(
        features, logits, ref["omega"], ref["temperature"], affinity_temperature=1.0
    )
    assert torch.equal(default, explicit)
    assert torch.equal(affinity(features), affinity(features, 1.0))
    np.testing.assert_allclose(explicit.numpy(), np.array(ref["targets"]), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(3, 24), seed=st.integers(0, 10_000))
def test_small_tau_concentrates_the_affinity_on_the_nearest_neighbour(b, seed):
    """As tau falls, each row's mass on its most similar other image rises towards 1; it
    never falls below the bound 1 / (1 + (B - 2) exp(-gap / tau)) of the softmax."""
    features, _ = random_batch(b, 5, 2, seed)
    f = torch.from_numpy(features)
    normed = torch.nn.functional.normalize(f, dim=1)
    cosine = (normed @ normed.t()).fill_diagonal_(-np.inf)
    nearest = cosine.argmax(dim=1)
    top2 = cosine.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).numpy()
    rows = torch.arange(b)
    previous = np.zeros(b)
    for tau in (10.0, 1.0, 0.3, 0.1, 0.03, 0.01):
        mass = affinity(f, tau)[rows, nearest].numpy()
        assert (mass >= previous - 1e-12).all()  # monotone in tau
        bound = 1.0 / (1.0 + (b - 2) * np.exp(-gap / tau))
        assert (mass >= bound - 1e-12).all()
        previous = mass
    uniform = 1.0 / (b - 1)
    np.testing.assert_allclose(affinity(f, 1e6)[rows, nearest].numpy(), uniform, atol=1e-5)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_invalid_tau_rejected_naming_the_key(tau):
    with pytest.raises(ValueError, match=r"^bake\.affinity_temperature: must be"):
        soft_targets(torch.randn(4, 3), torch.randn(4, 2), 0.5, 4.0, affinity_temperature=tau)


def test_bake_loss_and_config_carry_tau():
    from bake_ray.core import config as cfg

    config = cfg.load(overrides=["bake.affinity_temperature=0.1"])
    assert config.bake.affinity_temperature == 0.1 and cfg.load().bake.affinity_temperature == 1.0
    b = config.bake
    loss = build_loss("bake", b.temperature, b.omega, affinity_temperature=0.1)
    features, logits, labels = torch.randn(8, 6), torch.randn(8, 4), torch.randint(0, 4, (8,))
    expected = distillation_loss(logits, soft_targets(features, logits, 0.5, 4.0, "auto",
                                                      1e-6, 0.1), 4.0)  # fmt: skip
    torch.testing.assert_close(loss(features, logits, labels).kd, expected)


# ------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(2, 40),
    c=st.integers(2, 12),
    omega=st.floats(0.0, 0.99),
    temperature=st.floats(0.05, 50.0),
    seed=st.integers(0, 10_000),
)
def test_rows_are_distributions(b, c, omega, temperature, seed):
    features, logits = random_batch(b, 5, c, seed)
    q = soft_targets(torch.from_numpy(features), torch.from_numpy(logits), omega, temperature)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b, dtype=torch.float64))
    assert (q >= 0).all()


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 30), temperature=st.floats(0.1, 20.0), seed=st.integers(0, 10_000))
def test_omega_zero_gives_tempered_softmax(b, temperature, seed):
    features, logits = random_batch(b, 5, 6, seed)
    z = torch.from_numpy(logits)
    q = soft_targets(torch.from_numpy(features), z, 0.0, temperature)
    torch.testing.assert_close(q, torch.softmax(z / temperature, dim=1), rtol=0, atol=1e-15)


def test_affinity_excludes_self_even_for_identical_images():
    """Duplicates must not attend to themselves: with all features equal, A = (J - I)/(B-1)."""
    features = torch.ones(4, 3, dtype=torch.float64)
    logits = torch.eye(4, dtype=torch.float64)
    omega = 0.5
    q = soft_targets(features, logits, omega, 1.0)
    a = (torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)) / 3
    p = torch.softmax(logits, dim=1)
    expected = (1 - omega) * torch.linalg.inv(torch.eye(4, dtype=torch.float64) - omega * a) @ p
    torch.testing.assert_close(q, expected)


def test_large_temperature_flattens_targets():
    features, logits = random_batch(8, 4, 5, seed=9)
    q = soft_targets(torch.from_numpy(features), torch.from_numpy(logits), 0.5, 1e6)
    np.testing.assert_allclose(q.numpy(), np.full((8, 5), 0.2), atol=1e-5)


def test_gradients_flow_only_into_student_logits():
    features = torch.randn(16, 8, requires_grad=True)
    logits = torch.randn(16, 5, requires_grad=True)
    targets = soft_targets(features, logits, 0.5, 4.0)
    assert not targets.requires_grad
    kd = distillation_loss(logits, targets, 4.0)
    kd.backward()
    assert features.grad is None  # KD never reaches the features
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # The gradient equals that of KL against a constant target: T * (softmax(z/T) - Q) / B.
    expected = 4.0 * (torch.softmax(logits.detach() / 4.0, dim=1) - targets) / 16
    torch.testing.assert_close(logits.grad, expected)


def test_bake_loss_parts_and_weighting():
    torch.manual_seed(0)
    features, logits = torch.randn(8, 6), torch.randn(8, 4)
    labels = torch.randint(0, 4, (8,))
    parts = BakeLoss(temperature=2.0, omega=0.3, loss_weight=2.5)(features, logits, labels)
    assert isinstance(parts, LossParts)
    expected_ce = torch.nn.functional.cross_entropy(logits, labels)
    expected_kd = distillation_loss(logits, soft_targets(features, logits, 0.3, 2.0), 2.0)
    torch.testing.assert_close(parts.ce, expected_ce)
    torch.testing.assert_close(parts.kd, expected_kd)
    torch.testing.assert_close(parts.total, expected_ce + 2.5 * expected_kd)


def test_baselines_share_the_interface():
    features, logits, labels = torch.randn(8, 6), torch.randn(8, 4), torch.randint(0, 4, (8,))
    ce = build_loss("ce")(features, logits, labels)
    smooth = build_loss("label_smoothing", label_smoothing=0.2)(features, logits, labels)
    assert ce.kd.item() == 0.0 and ce.total.item() == ce.ce.item()
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(smooth.total, expected)
    with pytest.raises(ValueError, match="unknown method"):
        build_loss("mixup")


@pytest.mark.parametrize(("omega", "temperature"), [(1.0, 4.0), (-0.1, 4.0), (0.5, 0.0)])
def test_invalid_hyperparameters_rejected(omega, temperature):
    with pytest.raises(ValueError):
        soft_targets(torch.randn(4, 3), torch.randn(4, 2), omega, temperature)


# ------------------------------------------------------------------ global ensembling


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, features, logits, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = features.shape[0] // world
        mine = slice(rank * b, (rank + 1) * b)
        q = global_soft_targets(features[mine], logits[mine], 0.6, 3.0)
        neumann = global_soft_targets(features[mine], logits[mine], 0.6, 3.0, "neumann", 1e-3)
        local_only = soft_targets(features[mine], logits[mine], 0.6, 3.0)
        tau = global_soft_targets(features[mine], logits[mine], 0.6, 3.0, "solve", 1e-6, 0.2)
        torch.save(
            {"global": q, "neumann": neumann, "local": local_only, "tau": tau},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_single_process_on_concatenated_batch(tmp_path):
    torch.manual_seed(1)
    features, logits = torch.randn(24, 10), torch.randn(24, 6) * 3
    mp.spawn(_worker, args=(2, _free_port(), features, logits, str(tmp_path)), nprocs=2)
    single = soft_targets(features, logits, 0.6, 3.0)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["global"] for p in parts]), single, rtol=0, atol=1e-6)
    # The iterative solver ensembles over the same global batch, within its tolerance.
    single_neumann = soft_targets(features, logits, 0.6, 3.0, "neumann", 1e-3)
    global_neumann = torch.cat([p["neumann"] for p in parts])
    torch.testing.assert_close(global_neumann, single_neumann, rtol=0, atol=1e-6)
    assert (global_neumann - single).abs().sum(dim=1).max() <= 1e-3
    # tau (bake.affinity_temperature) enters the global affinity too.
    single_tau = soft_targets(features, logits, 0.6, 3.0, "solve", 1e-6, 0.2)
    global_tau = torch.cat([p["tau"] for p in parts])
    torch.testing.assert_close(global_tau, single_tau, rtol=0, atol=1e-6)
    assert (global_tau - single).abs().max() > 1e-3
    # And the global batch really changes the targets compared to per-worker ensembling.
    local = torch.cat([p["local"] for p in parts])
    assert (local - single).abs().max() > 1e-3


# ------------------------------------------------------------------ global ensembling in training

_STEP_CONFIG = {
    "bake": {"temperature": 2.0, "omega": 0.8},
    "data": {"batch_size": 12, "same_class": 1},
    "runtime": {"amp": False},
}


def _one_batch(world: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step: digits-shaped images, classmates in pairs."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(world * batch, 1, 8, 8, generator=generator)
    labels = torch.arange(world * batch).div(2, rounding_mode="floor") % 10
    return images, labels


def _train_step_worker(rank: int, world: int, port: int, on: bool, out_dir: str) -> None:
    """One real training step through the engine (DDP model, BAKE loss, optimizer step)."""
    from bake_ray.core import config as cfg
    from bake_ray.core.engine import Context, build_state, train_one_epoch
    from bake_ray.core.epoch import unwrapped

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = cfg.from_dict(
            {**_STEP_CONFIG, "bake": {**_STEP_CONFIG["bake"], "global_ensembling": on}}
        )
        torch.manual_seed(rank)  # different inits: DDP must make rank 0's the common one
        state = build_state(config, Context(torch.device("cpu"), rank, world), 10, 1, 8, 1)
        start = {k: v.clone() for k, v in unwrapped(state.model).state_dict().items()}
        images, labels = _one_batch(world, config.data.batch_size)
        mine = slice(rank * config.data.batch_size, (rank + 1) * config.data.batch_size)
        ctx = Context(torch.device("cpu"), rank, world)
        metrics = train_one_epoch(state, [(images[mine], labels[mine])], ctx, amp=False)
        torch.save({"kd": metrics["train_kd"], "start": start}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _kd_of_two_process_step(tmp_path: Path, on: bool) -> tuple[float, float]:
    """(KD the engine reported, KD of single-process BakeLoss on the concatenated batch)."""
    from bake_ray.core.models import build_model, to_channels_last

    out = tmp_path / ("on" if on else "off")
    out.mkdir()
    mp.spawn(_train_step_worker, args=(2, _free_port(), on, str(out)), nprocs=2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["kd"] == ranks[1]["kd"]  # summed over workers: every rank reports it
    model = build_model("small_cnn", 10, 1, 8)
    model.load_state_dict(ranks[0]["start"])
    to_channels_last(model)  # the memory format the engine chose (runtime.channels_last unset)
    model.train()  # batch-norm statistics per worker's half, as each worker computed them
    batch = _STEP_CONFIG["data"]["batch_size"]
    images, labels = _one_batch(2, batch)
    halves = [model(images[:batch]), model(images[batch:])]
    features = torch.cat([h[0] for h in halves])
    logits = torch.cat([h[1] for h in halves])
    bake = _STEP_CONFIG["bake"]
    reference = BakeLoss(bake["temperature"], bake["omega"], 1.0, global_ensembling=False)
    return ranks[0]["kd"], reference(features, logits, labels).kd.item()


def test_training_step_on_two_workers_distils_towards_the_global_batch(tmp_path):
    """One 2-process step through ``train_one_epoch``: with ``bake.global_ensembling`` on,
    the KD term is single-process BakeLoss on the concatenated batch; off, it is not."""
    on, reference = _kd_of_two_process_step(tmp_path, on=True)
    off, same_reference = _kd_of_two_process_step(tmp_path, on=False)
    assert reference == same_reference  # both runs started from the same weights and batch
    assert on == pytest.approx(reference, rel=1e-5, abs=0)
    assert abs(off - reference) > 100 * 1e-5 * reference, (off, reference)
