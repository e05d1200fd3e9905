"""Remedies for sub-keys that stop being chosen: query whitening and per-half norms, k-means init, dead
sub-key restarts (and their optimizer state), the marginal-entropy balance loss, SimVQ and frozen sub-keys;
off by default and then changing nothing; resumed exactly by the trainer; refused where they cannot work."""

import math

import pytest
import torch
from test_distributed import run
from test_train import MEMORY, TINY, Interrupt, crash_at, records

from memlayers import MemoryLayer, build_optimizer, preset
from memlayers.memory.addressing.subkeys import balance_loss, kmeans
from memlayers.memory.norms import RunningWhitening
from memlayers.optim.reset import reset_state
from memlayers.train import load_config, read_checkpoint, train

DIM = 24


def layer(**options) -> MemoryLayer:
    torch.manual_seed(0)
    return MemoryLayer(preset("memory", DIM, n_keys=8, heads=2, topk=3, key_dim=8, **options))


def skewed(T: int = 96, seed: int = 1) -> torch.Tensor:
    """Inputs with a large shared mean and correlated features: the queries a baseline collapses on."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 + torch.randn(T, DIM, generator=g) @ torch.randn(DIM, DIM, generator=g) * 0.3


def train_steps(m: MemoryLayer, steps: int, x: torch.Tensor, lr: float = 1e-2):
    opt = build_optimizer(m, lr)
    for _ in range(steps):
        out = m(x).square().mean()
        aux = m.aux_loss()
        (out if aux is None else out + aux).backward()
        opt.step()
        opt.zero_grad()
        m.after_step(opt)
    return opt


# ---- off by default: nothing changes


def test_remedies_off_change_nothing():
    m = layer()
    a = m.addressing
    assert sorted(m.state_dict()) == [
        "addressing.keys",
        "addressing.query.bias",
        "addressing.query.weight",
        "store.weight",
    ]
    assert a.restarts is None and a.key_map is None and a.one_process_only is None
    x = skewed()
    ids, w = m.retrieve(x)
    # the selection is still the exact top-k of the scores of the learned keys
    q = a.query(x).view(-1, 2, 2, 4)
    scores = (
        torch.einsum("thd,hnd->thn", q[:, :, 0], a.keys[:, 0])[..., :, None]
        + torch.einsum("thd,hnd->thn", q[:, :, 1], a.keys[:, 1])[..., None, :]
    )
    assert torch.equal(ids.sort(-1).values, scores.flatten(-2).topk(3, dim=-1).indices.sort(-1).values)
    # training with the hooks called equals training without them: bit for bit
    plain = layer()
    opt_plain = build_optimizer(plain, 1e-2)
    for _ in range(3):
        plain(x).square().mean().backward()
        opt_plain.step()
        opt_plain.zero_grad()
    train_steps(m, 3, x)
    assert m.aux_loss() is None
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in m.state_dict().items())
    assert m.usage.summary() == plain.usage.summary()


def test_unknown_or_impossible_options_are_refused():
    with pytest.raises(ValueError, match="key_param: unknown 'learnt'"):
        preset("memory", DIM, key_param="learnt")
    with pytest.raises(ValueError, match="key_restart: moves learned sub-keys, not 'simvq'"):
        preset("memory", DIM, key_param="simvq", key_restart=0.1)
    with pytest.raises(ValueError, match="balance_tau: must be > 0"):
        preset("memory", DIM, balance_loss=0.01, balance_tau=0.0)
    with pytest.raises(ValueError, match="query_norm: unknown 'zca'"):
        preset("memory", DIM, query_norm="zca")
    with pytest.raises(ValueError, match="balance_loss: is an option of plain product keys"):
        preset("ultramem", 64, balance_loss=0.01)


# ---- query normalisations


def test_whitening_whitens_each_head_by_running_statistics():
    torch.manual_seed(0)
    w = RunningWhitening(heads=2, dim=4, momentum=0.5)
    mix = torch.randn(2, 4, 4)
    data = lambda n: (torch.randn(n, 2, 1, 4) @ mix + torch.tensor([1.0, -2, 3, 0])).reshape(n, 8)  # noqa: E731
    for _ in range(40):
        w(data(4000))
    w.eval()
    y = w(data(20000)).view(-1, 2, 4)
    assert y.mean(0).abs().max() < 0.05
    for h in range(2):
        assert (torch.cov(y[:, h].T) - torch.eye(4)).abs().max() < 0.06
    x = data(5)
    assert torch.allclose(w(x)[2:3], w(x[2:3]), atol=1e-6)  # eval: no batch dependence


def test_whitening_statistics_skip_padding():
    torch.manual_seed(0)
    a, b = RunningWhitening(1, 3), RunningWhitening(1, 3)
    x = torch.randn(10, 3)
    mask = torch.tensor([True] * 6 + [False] * 4)
    a(torch.cat([x[:6], 100 + x[6:]]), mask)
    b(x[:6])
    for name in ("running_mean", "running_cov", "whitening"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    c = RunningWhitening(1, 3)
    c(x, torch.zeros(10, dtype=torch.bool))  # nothing real: statistics unchanged (the identity)
    assert torch.equal(c.running_cov, torch.eye(3)[None]) and torch.allclose(c.whitening, torch.eye(3)[None])


@pytest.mark.parametrize("kind", ["layernorm_half", "rmsnorm_half"])
def test_per_half_norms_normalise_each_half(kind):
    m = layer(query_norm=kind)
    q = m.addressing.query_norm(torch.randn(7, 2, 8) * 5 + 2).view(7, 2, 2, 4)
    if kind == "layernorm_half":
        assert q.mean(-1).abs().max() < 1e-5
        assert (q.var(-1, correction=0) - 1).abs().max() < 1e-3
    else:
        assert (q.square().mean(-1) - 1).abs().max() < 1e-3


# ---- k-means init


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.randn(5, 3) * 10
    x = (centers[:, None] + 0.01 * torch.randn(5, 50, 3)).reshape(-1, 3)
    found = kmeans(x, 5, iters=20)
    assert torch.cdist(centers, found).min(1).values.max() < 0.1
    assert kmeans(x[:3], 8).shape == (8, 3)  # fewer points than centroids: drawn with noise


def test_kmeans_init_sets_keys_once_and_resume_keeps_them():
    m = layer(key_init="kmeans")
    a = m.addressing
    m.eval()
    m(skewed())
    assert not bool(a.keys_ready)  # eval does not initialise
    m.train()
    x = skewed()
    norms = a.keys.detach().norm(dim=-1).mean(-1, keepdim=True)  # (H, 2, 1) the initial keys' mean norm
    torch.manual_seed(5)
    m(x)
    assert bool(a.keys_ready)
    q = a.query(x).view(-1, 2, 2, 4).detach()
    torch.manual_seed(5)
    for half in range(2):  # each key the direction of a k-means centroid of the sub-queries, at the initial norm
        for h in range(2):
            centroids = kmeans(q[:, h, half], 8)
            expected = centroids / centroids.norm(dim=-1, keepdim=True) * norms[h, half]
            assert torch.allclose(a.keys[h, half], expected, atol=1e-6)
    keys = a.keys.detach().clone()
    m(skewed(seed=2))
    assert torch.equal(a.keys, keys)  # only once
    again = layer(key_init="kmeans")
    again.load_state_dict(m.state_dict())
    again.train()(skewed(seed=3))
    assert torch.equal(again.addressing.keys, keys)  # loaded as initialised: not clustered again


# ---- dead sub-key restarts


def test_restart_moves_a_dead_key_and_resets_its_optimizer_state():
    m = layer(key_restart=0.05, restart_every=3)
    a = m.addressing
    opt = train_steps(m, 2, skewed())  # steps 1, 2: no restart yet; Adam has moments for every key
    state = opt.state[a.keys]
    assert state["exp_avg_sq"].abs().sum((-1)).gt(0).any()
    a.restarts.counts[0, 1, 5] = 0.0  # make (head 0, half 1, sub-key 5) dead
    a.restarts.counts[1, 0, 2] = 0.0
    share = a.restarts.counts.sum(-1, keepdim=True).expand(-1, -1, 8) / 8
    live = a.restarts.counts >= 0.05 * share
    keys = a.keys.detach().clone()
    state["exp_avg"].fill_(1.0)
    state["exp_avg_sq"].copy_(torch.arange(8.0).view(1, 1, 8, 1).expand_as(state["exp_avg_sq"]))
    m.after_step(opt)  # the 3rd step: restart
    dead = ~live
    assert dead[0, 1, 5] and dead[1, 0, 2]
    moved = (a.keys != keys).any(-1)
    assert torch.equal(moved, dead)  # dead keys moved, live ones untouched
    for h, half, i in dead.nonzero().tolist():  # each along a recent sub-query (plus 1% noise), at the live keys' norm
        key, recent = a.keys[h, half, i], a.restarts.recent[h, half]
        assert torch.cosine_similarity(recent, key[None], dim=-1).max() > 0.99
        live_norm = keys[h, half][live[h, half]].norm(dim=-1).mean()
        assert abs(key.norm() - live_norm) < 1e-5 * live_norm
    assert state["exp_avg"][dead].eq(0).all() and state["exp_avg"][live].eq(1).all()  # first moments forgotten
    for h, half, i in dead.nonzero().tolist():  # second moments: the mean of the live keys' (no huge first steps)
        expected = live[h, half].nonzero().float().mean()
        assert torch.allclose(state["exp_avg_sq"][h, half, i], expected.expand(4))
    assert torch.equal(state["exp_avg_sq"][live], torch.arange(8.0).view(1, 1, 8, 1).expand(2, 2, 8, 4)[live])
    assert torch.allclose(a.restarts.counts[dead], share[dead])  # counted as fair: not restarted again at once
    assert int(a.restarts.total) == int(dead.sum())


def test_restart_resets_state_through_a_combined_optimizer():
    m = layer(key_restart=0.05, restart_every=1, sparse_values=True)
    opt = build_optimizer(m, 1e-2, value_optimizer="sparse_adam")  # a CombinedOptimizer: AdamW + SparseRowAdam
    m(skewed()).square().mean().backward()
    opt.step()
    a = m.addressing
    a.restarts.counts[0, 0, 3] = 0.0
    m.after_step(opt)
    assert opt.state[a.keys]["exp_avg"][0, 0, 3].eq(0).all() and int(a.restarts.total) >= 1


def test_remedies_in_a_bf16_model():
    m = layer(query_norm="whiten", key_restart=0.1, restart_every=2, balance_loss=0.01).to(torch.bfloat16)
    a = m.addressing
    assert a.query_norm.running_mean.dtype == a.query_norm.whitening.dtype == a.restarts.counts.dtype == torch.float32
    train_steps(m, 4, skewed().bfloat16())
    assert all(torch.isfinite(p).all() for p in m.parameters()) and a.restarts.steps == 4


def test_reset_state_zeroes_only_the_given_entries_of_same_shaped_state():
    p = torch.nn.Parameter(torch.ones(2, 3, 4))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    where = torch.zeros(2, 3, dtype=torch.bool)
    where[1, 2] = True
    s = opt.state[p]
    s["exp_avg_sq"][1, :2] = torch.tensor([[1.0], [3.0]])
    reset_state(opt, p, where)
    assert s["exp_avg"][1, 2].eq(0).all() and s["exp_avg"][~where].ne(0).all()
    assert s["exp_avg_sq"][1, 2].eq(2.0).all()  # the mean of row 1's kept entries
    assert float(s["step"]) == 1  # state of another shape untouched


# ---- the balance loss


def test_balance_loss_value_and_gradient():
    torch.manual_seed(0)
    T, H, n, d = 6, 2, 5, 3
    halves = tuple(torch.randn(T, H, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keys = torch.randn(H, 2, n, d, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True, True])
    loss = balance_loss(halves, keys, 0.7, mask)
    expected = 0.0  # by hand: mean over (head, half) of log n - H(marginal over the real tokens)
    for h in range(H):
        for a in range(2):
            p = torch.stack([(halves[a][t, h] @ keys[h, a].T / 0.7).softmax(0) for t in range(T) if mask[t]]).mean(0)
            expected += (math.log(n) + (p * p.log()).sum()) / (2 * H)
    assert abs(loss.item() - expected.item()) < 1e-12
    assert torch.autograd.gradcheck(lambda q1, q2, k: balance_loss((q1, q2), k, 0.7, mask), (*halves, keys))
    loss.backward()
    assert keys.grad.norm(dim=-1).gt(0).all()  # every sub-key gets a gradient, chosen or not
    assert halves[0].grad[2].eq(0).all()  # padding none
    far = torch.zeros_like(keys.detach())  # every query picks sub-key 0: the others' probabilities underflow to 0
    far[:, :, 0] = 1e4
    loss = balance_loss(tuple(torch.ones_like(h) for h in halves), far.requires_grad_(), 0.01)
    loss.backward()
    assert abs(loss.item() - math.log(n)) < 1e-9 and torch.isfinite(far.grad).all()
    empty = balance_loss(tuple(h[:0] for h in halves), keys, 0.7)
    assert empty.item() == 0.0


def test_balance_loss_spreads_the_picks():
    x = skewed(256)
    plain, balanced = layer(), layer(balance_loss=0.1, balance_tau=1.0)
    for m in (plain, balanced):
        train_steps(m, 60, x)
    assert balanced.aux_loss() is not None and balanced.eval().aux_loss() is None
    kl = [m.usage.summary()["subkey_kl_first"] for m in (plain, balanced)]
    assert kl[1] < 0.7 * kl[0]


# ---- SimVQ and frozen sub-keys


def test_simvq_basis_stays_frozen_and_every_key_moves():
    m = layer(key_param="simvq")
    a = m.addressing
    assert "addressing.keys" in m.state_dict() and not isinstance(a.keys, torch.nn.Parameter)
    assert torch.equal(a.scored_keys(torch.float32), a.keys)  # the map starts as the identity
    basis, before = a.keys.clone(), a.scored_keys(torch.float32).detach()
    x = skewed()
    chosen = torch.zeros(2, 2, 8, dtype=torch.bool)
    ids = m.retrieve(x)[0]
    for h in range(2):
        chosen[h, 0, ids[:, h].div(8, rounding_mode="floor").unique()] = True
        chosen[h, 1, ids[:, h].remainder(8).unique()] = True
    train_steps(m, 1, x)
    assert torch.equal(a.keys, basis)
    moved = (a.scored_keys(torch.float32) - before).norm(dim=-1) > 0
    assert moved.all() and not chosen.all()  # unchosen sub-keys moved too
    assert a.param_roles()["keys"] == [a.key_map]


def test_frozen_keys_never_change():
    m = layer(key_param="frozen")
    keys = m.addressing.keys.clone()
    train_steps(m, 3, skewed())
    assert torch.equal(m.addressing.keys, keys)
    assert m.addressing.param_roles()["keys"] == []
    assert all(p is not m.addressing.keys for p in m.parameters())


# ---- in the trainer: resumed exactly


REMEDIES = ", key_init: kmeans, key_restart: 0.5, restart_every: 2, balance_loss: 0.01, query_norm: whiten"


def test_trainer_resumes_remedies_exactly(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + [MEMORY % REMEDIES])
    ref = train(cfg, tmp_path / "ref", evaluate=False)
    crash_at(monkeypatch, 6)  # checkpoint at step 4
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", evaluate=False)
    monkeypatch.undo()
    result = train(cfg, tmp_path / "run", evaluate=False)
    assert records(tmp_path / "run") == records(tmp_path / "ref")
    assert result["final_loss"] == ref["final_loss"]
    state = read_checkpoint(tmp_path / "ref")["model"]
    restarted = [v for k, v in state.items() if k.endswith("restarts.total")]
    assert restarted and int(restarted[0]) > 0  # restarts happened, and resumed exactly through them
    assert any(rec.get("aux_loss", 0) > 0 for rec in records(tmp_path / "ref"))


def _refused_under_parallelize(rank, world):
    from memlayers.distributed import parallelize
    from memlayers.model import MemorySpec, ModelConfig, Transformer

    spec = MemorySpec(layers="0", preset="memory", options={"n_keys": 4, "topk": 2, "key_restart": 0.1})
    model = Transformer(ModelConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, max_seq_len=8, memories=[spec]))
    with pytest.raises(ValueError, match="parallelize: key_restart moves sub-keys on one process only"):
        parallelize(model)


def test_restart_is_refused_under_parallelize():
    run(2, _refused_under_parallelize)


def _synced_remedies_match_one_process(rank, world):
    """Whitening's statistics and the balance loss under ``parallelize`` are one process's on the whole batch."""
    import copy

    from conftest import rel_err

    from memlayers.distributed import parallelize
    from memlayers.model import MemorySpec, ModelConfig, Transformer

    options = {"n_keys": 8, "topk": 2, "heads": 2, "query_norm": "whiten", "balance_loss": 0.1}
    spec = MemorySpec(layers="0", preset="memory", options=options)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=12, memories=[spec]))
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 40, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    for _ in range(2):  # the second forward whitens with the first's statistics
        out = ref(x, y)
    (out.loss + out.aux_loss).backward()
    plan = parallelize(model)
    rows = plan.batch_rows(x.shape[0])
    for _ in range(2):
        mine = model(x[rows], y[rows])
    # (a KL near 0 is a difference of entropies near log n: compared on that scale)
    assert abs(mine.aux_loss - out.aux_loss) < 1e-7 and out.aux_loss > 0
    (mine.loss / world + mine.aux_loss / world).backward()
    norm, ref_norm = model.blocks[0].memory.addressing.query_norm, ref.blocks[0].memory.addressing.query_norm
    assert rel_err(norm.running_cov, ref_norm.running_cov) < 1e-5
    checked = 0
    for name, p in model.named_parameters():
        if hasattr(p.grad, "full_tensor"):  # (the value table's gradients are reduced by the plan, not FSDP2)
            assert rel_err(p.grad.full_tensor(), dict(ref.named_parameters())[name].grad) < 1e-4, name
            checked += "addressing" in name
    assert checked >= 4  # query, keys, whitening's scale and shift


def test_whitening_and_balance_loss_over_every_process():
    run(2, _synced_remedies_match_one_process)
