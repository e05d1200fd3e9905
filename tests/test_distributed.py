"""Sharded value tables on torch.distributed (gloo, CPU): 2 and 4 processes against one process computing
the same thing, and the example under torchrun. Every process builds the same table and every rank's inputs from seeds, so each can run
the single-process reference itself."""

import copy
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import rel_err
from torch import nn

from memlayers import ValueTable
from memlayers.distributed import ColumnShardedTable, RowShardedTable, ShardedStore, shard_values
from memlayers.model import MemorySpec, ModelConfig, Transformer

N, D, T, H, K = 37, 12, 5, 2, 3
SCHEMES = {"columns": ColumnShardedTable, "rows": RowShardedTable}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharded_values.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on each of ``world`` gloo processes; a failure in any of them fails the test.

    The processes (a group per world size) serve every test of the session: starting them (importing torch,
    joining the group) costs more than most tests do. A group in which a test failed is replaced."""
    group = _GROUPS.get(world)
    if group is None or not group.alive():
        group = _GROUPS[world] = _Group(world)
    group.run(fn, args)


class _Group:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world, self.tasks, self.done = world, [ctx.SimpleQueue() for _ in range(world)], ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.done), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, args: tuple, timeout: float = 600) -> None:
        for tasks in self.tasks:
            tasks.put((fn, args))
        deadline, answers = time.monotonic() + timeout, 0
        while answers < self.world:
            try:
                rank, error = self.done.get(timeout=1)
                answers += 1
            except queue.Empty:
                if self.alive() and time.monotonic() < deadline:
                    continue
                rank, error = "?", "a process died" if not self.alive() else f"no answer in {timeout} s"
            if error is not None:  # the other ranks may be stuck in a collective: start afresh next time
                for p in self.procs:
                    p.kill()
                    p.join()
                raise AssertionError(f"rank {rank} of {self.world} failed:\n{error}")


_GROUPS: dict[int, _Group] = {}


def _serve(rank, world, port, tasks, done):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    while True:
        fn, args = tasks.get()
        try:
            fn(rank, world, *args)
            dist.barrier()  # every rank done before the next task
        except BaseException:  # noqa: BLE001 (reported to the test, which fails)
            done.put((rank, traceback.format_exc()))
            return
        done.put((rank, None))


def rank_inputs(r: int, tokens: int = T, rows: int = N):
    """Rank r's ids (tokens, H, K) in [0, rows), weights (tokens, H, K) and output gradient (tokens, D)."""
    g = torch.Generator().manual_seed(100 + r)
    ids = torch.randint(0, rows, (tokens, H, K), generator=g)
    ids[0, 0, :2] = 7  # the same row twice in a token, and in every rank's first token
    return ids, torch.randn(tokens, H, K, generator=g), torch.randn(tokens, D, generator=g)


def _sharded_matches_one_process(rank, world, scheme, sparse_grad, rows):
    torch.manual_seed(0)
    table = ValueTable(N, D, sparse_grad=sparse_grad)
    # one process, every rank's tokens
    ref = copy.deepcopy(table)
    inputs = [rank_inputs(r, rows=rows) for r in range(world)]
    ref_weights = [w.clone().requires_grad_() for _, w, _ in inputs]
    ref_outs = [ref(ids, w) for (ids, _, _), w in zip(inputs, ref_weights)]
    sum((out * g).sum() for out, (_, _, g) in zip(ref_outs, inputs)).backward()
    # this rank's tokens, through the sharded store
    store = SCHEMES[scheme](table)
    ids, weights, grad_out = inputs[rank]
    weights = weights.clone().requires_grad_()
    out = store(ids, weights)
    (out * grad_out).sum().backward()
    assert rel_err(out, ref_outs[rank]) < 1e-6
    assert rel_err(weights.grad, ref_weights[rank].grad) < 1e-6
    assert torch.equal(store.full_weight(), table.weight)
    mine = (slice(None), slice(*store.columns)) if scheme == "columns" else slice(*store.rows)
    expected = ref.weight.grad.to_dense()[mine]
    if store.weight.grad is None:  # rows: no token read ours
        assert scheme == "rows" and not expected.any()
        return
    assert rel_err(store.weight.grad, expected) < 1e-6 if expected.any() else not store.weight.grad.to_dense().any()
    assert store.weight.grad.is_sparse == sparse_grad
    if sparse_grad:  # the rows touched are the rows read, no more (the row-wise bags' padding touches none)
        touched = set(store.weight.grad.coalesce().indices()[0].tolist())
        read = {int(i) - (store.rows[0] if scheme == "rows" else 0) for i, _, _ in inputs for i in i.flatten()}
        assert touched == ({i for i in read if 0 <= i < store.weight.shape[0]} if scheme == "rows" else read)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_table_matches_one_process(scheme, world, sparse_grad):
    run(world, _sharded_matches_one_process, scheme, sparse_grad, N)


def test_row_sharded_table_with_a_rank_nobody_reads():
    """Every id in the first rank's rows: the other rank bags nothing, and the collectives still match."""
    run(2, _sharded_matches_one_process, "rows", True, 10)


def _sharded_ive_matches_one_process(rank, world, scheme, cores, weight_cores, sparse_grad, rows):
    """UltraMem's expansion sharded: outputs and every gradient (slot weights, the local part of V, the summed
    projection gradient) equal one process's on every rank's tokens."""
    from memlayers.distributed import IVE_SHARDINGS
    from memlayers.memory.stores import ImplicitValueExpansion

    torch.manual_seed(0)
    store = ImplicitValueExpansion(N, D, 3, 10, cores=cores, sparse_grad=sparse_grad)
    ref = copy.deepcopy(store)
    inverse = torch.argsort(store.perm)
    inputs = []
    for r in range(world):  # physical rows in [0, rows), any block
        g = torch.Generator().manual_seed(100 + r)
        physical = torch.randint(0, rows, (T, H, K), generator=g) + N * torch.randint(0, 3, (T, H, K), generator=g)
        physical[0, 0, :2] = physical[0, 0, 0]  # the same slot twice in a token
        shape = (T, H, K, weight_cores) if weight_cores > 1 else (T, H, K)
        inputs.append((inverse[physical], torch.randn(shape, generator=g), torch.randn(T, 10, generator=g)))
    ref_weights = [w.clone().requires_grad_() for _, w, _ in inputs]
    ref_outs = [ref(ids, w) for (ids, _, _), w in zip(inputs, ref_weights)]
    sum((out * g).sum() for out, (_, _, g) in zip(ref_outs, inputs)).backward()
    sharded = IVE_SHARDINGS[scheme](store)
    ids, weights, grad_out = inputs[rank]
    weights = weights.clone().requires_grad_()
    out = sharded(ids, weights)
    (out * grad_out).sum().backward()
    assert rel_err(out, ref_outs[rank]) < 1e-5
    assert rel_err(weights.grad, ref_weights[rank].grad) < 1e-5
    proj_grad = sharded.proj.grad.clone()
    dist.all_reduce(proj_grad)  # each rank's tokens' part (FSDP2 sums them in training)
    assert rel_err(proj_grad, ref.proj.grad) < 1e-5
    expected = sharded.part(ref.weight.grad.to_dense(), sharded.weight)
    grad = sharded.weight.grad
    if grad is None or not expected.any():  # rows: no token read ours
        assert not expected.any() and (grad is None or not grad.to_dense().any())
        return
    assert grad.is_sparse == sparse_grad
    assert rel_err(grad.to_dense(), expected) < 1e-5


@pytest.mark.parametrize(
    "scheme, world, cores, weight_cores, sparse_grad",
    [
        ("column", 2, 3, 3, False),  # slices of 2 columns: cores (0, 0, 1) and (1, 2, 2)
        ("column", 4, 3, 3, True),  # slices of 1 column
        ("column", 2, 3, 1, False),  # one weight for every core
        ("row", 2, 3, 3, True),
        ("row", 4, 1, 1, False),
    ],
)
def test_sharded_ive_matches_one_process(scheme, world, cores, weight_cores, sparse_grad):
    run(world, _sharded_ive_matches_one_process, scheme, cores, weight_cores, sparse_grad, N)


def test_row_sharded_ive_with_a_rank_nobody_reads():
    run(2, _sharded_ive_matches_one_process, "row", 3, 3, True, 10)


def _sharded_peer_matches_one_process(rank, world, scheme, sparse_grad, rows):
    """PEER's experts sharded: outputs and gradients (gates, x, this rank's part of u and v) equal one process's."""
    from memlayers.distributed import PEER_SHARDINGS
    from memlayers.memory.stores import PEERExperts

    torch.manual_seed(0)
    store = PEERExperts(N, 8, 12, sparse_grad=sparse_grad)  # in_dim 8, out_dim 12
    ref = copy.deepcopy(store)
    inputs = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        ids = torch.randint(0, rows, (T, H, K), generator=g)
        ids[0, 0, :2] = 3  # the same expert twice in a token
        inputs.append((ids, torch.randn(T, H, K, generator=g), torch.randn(T, 8, generator=g)))
    grad_outs = [torch.randn(T, store.out_dim, generator=torch.Generator().manual_seed(7 + r)) for r in range(world)]
    leaves = [(w.clone().requires_grad_(), x.clone().requires_grad_()) for _, w, x in inputs]
    ref_outs = [ref(ids, w, x) for (ids, _, _), (w, x) in zip(inputs, leaves)]
    sum((out * g).sum() for out, g in zip(ref_outs, grad_outs)).backward()
    sharded = PEER_SHARDINGS[scheme](store)
    ids, w, x = inputs[rank]
    w, x = w.clone().requires_grad_(), x.clone().requires_grad_()
    out = sharded(ids, w, x)
    (out * grad_outs[rank]).sum().backward()
    assert rel_err(out, ref_outs[rank]) < 1e-5
    assert rel_err(w.grad, leaves[rank][0].grad) < 1e-5 and rel_err(x.grad, leaves[rank][1].grad) < 1e-5
    for mine, whole in ((sharded.u, ref.u), (sharded.v, ref.v)):
        expected = sharded.part(whole.grad.to_dense(), mine)
        if mine.grad is None or not expected.any():  # rows: no token read ours
            assert not expected.any() and (mine.grad is None or not mine.grad.to_dense().any())
            continue
        assert mine.grad.is_sparse == sparse_grad
        assert rel_err(mine.grad.to_dense(), expected) < 1e-5


@pytest.mark.parametrize(
    "scheme, world, sparse_grad", [("column", 2, False), ("column", 4, True), ("row", 2, True), ("row", 4, False)]
)
def test_sharded_peer_matches_one_process(scheme, world, sparse_grad):
    run(world, _sharded_peer_matches_one_process, scheme, sparse_grad, N)


def test_row_sharded_peer_with_a_rank_nobody_reads():
    run(2, _sharded_peer_matches_one_process, "row", True, 10)


def _empty_batches(rank, world):
    """Every sharded store, both ways, reads 0 tokens on every rank: (0, out) outputs and (0, ...) gradients;
    0 tokens on some ranks only is refused on every rank (none waits in a collective)."""
    from memlayers.distributed import IVE_SHARDINGS, PEER_SHARDINGS
    from memlayers.memory.stores import ImplicitValueExpansion, PEERExperts

    torch.manual_seed(0)
    stores = [(SCHEMES[s], ValueTable(N, D), 0) for s in SCHEMES]
    stores += [(PEER_SHARDINGS[s], PEERExperts(N, 8, 12), 8) for s in PEER_SHARDINGS]  # x: (T, in_dim 8)
    stores += [(IVE_SHARDINGS[s], ImplicitValueExpansion(N, D, 3, 10, cores=3), 0) for s in IVE_SHARDINGS]
    for cls, store, in_dim in stores:
        sharded = cls(store)

        def inputs(tokens):  # ids (tokens, H, K), weights (tokens, H, K), x (tokens, in_dim) or None
            x = torch.zeros(tokens, in_dim, requires_grad=True) if in_dim else None
            return torch.zeros(tokens, H, K, dtype=torch.long), torch.zeros(tokens, H, K, requires_grad=True), x

        ids, weights, x = inputs(0)
        out = sharded(ids, weights, x)
        assert out.shape == store(ids, weights, x).shape == (0, out.shape[1]), cls.__name__
        out.sum().backward()
        assert weights.grad.shape == weights.shape and not any(
            p.grad is not None and p.grad.to_dense().any() for p in sharded.parameters()
        ), cls.__name__
        with pytest.raises(ValueError, match=r"read \[0, 5\] tokens in this call"):
            sharded(*inputs(T * rank))  # 0 tokens on rank 0 only


def test_sharded_stores_read_an_empty_batch():
    run(2, _empty_batches)


def _sharded_refuses(rank, world, scheme):
    cls = SCHEMES[scheme]
    if scheme == "columns":
        with pytest.raises(ValueError, match="does not split into 2 equal column slices"):
            cls(ValueTable(N, 5))
    else:
        with pytest.raises(ValueError, match="leave a rank of the 2 without rows"):
            cls(ValueTable(1, D))
    store = cls(ValueTable(N, D))
    ids, weights, _ = rank_inputs(rank, tokens=T + rank)
    with pytest.raises(ValueError, match=r"read \[5, 6\] tokens in this call; every rank must read the same"):
        store(ids, weights)
    ids, weights, _ = rank_inputs(rank)
    ids[0, 0, 0] = N if rank == 1 else 0  # out of range on rank 1 only: every rank raises
    with pytest.raises(IndexError, match=r"ids outside \[0, 37\) on rank\(s\) \[1\]"):
        store(ids, weights)
    with pytest.raises(ValueError, match="the parameter is not this table's weight"):
        store.set_value_grad_sink(nn.Parameter(torch.zeros(1)), None)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_table_refuses_what_it_cannot_do(scheme):
    run(2, _sharded_refuses, scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_table_needs_torch_distributed(scheme):
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised; launch with torchrun"):
        SCHEMES[scheme](ValueTable(N, D))


def _model_matches_one_process(rank, world, sharding, sparse):
    """A model with a Memory+ pool read by two layers and a layer with its own table: outputs, losses, every
    dense gradient (this rank's tokens) and every value gradient (all ranks' tokens) as in one process."""
    options = {"n_keys": 8, "heads": 2, "topk": 4, "sparse_values": sparse}
    cfg = ModelConfig(
        vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16,
        memories=[MemorySpec("1,3", pool="values", options=options), MemorySpec("2", preset="memory", options=options)],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    batches = [torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    ref_grads, ref_logits = [], []
    for tokens in batches:
        ref.zero_grad(set_to_none=True)
        out = ref(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        ref_logits.append(out.logits.detach())
        ref_grads.append({n: p.grad.to_dense() for n, p in ref.named_parameters() if p.grad is not None})
    shard_values(model, sharding)
    assert model.pools["values"] is model.blocks[1].memory.store is model.blocks[3].memory.store  # still shared
    tokens = batches[rank]
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    assert rel_err(out.logits, ref_logits[rank]) < 1e-5
    sharded = {id(m.weight): m for m in model.modules() if isinstance(m, (ColumnShardedTable, RowShardedTable))}
    assert len(sharded) == 2
    for name, p in model.named_parameters():
        if id(p) in sharded:  # a shard: every rank's tokens, its columns or rows
            store = sharded[id(p)]
            whole = sum(g[name] for g in ref_grads)
            expected = whole[:, slice(*store.columns)] if sharding == "column" else whole[slice(*store.rows)]
        else:  # dense: this rank's tokens (no data parallelism yet)
            expected = ref_grads[rank].get(name)
        if expected is None or not expected.any():
            assert p.grad is None or not p.grad.to_dense().any(), name
        else:
            assert rel_err(p.grad, expected) < 1e-5, name


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("sharding", ["column", "row"])
def test_sharded_model_matches_one_process(sharding, sparse):
    run(2, _model_matches_one_process, sharding, sparse)


def test_shard_values_refuses():
    with pytest.raises(ValueError, match="sharding must be one of"):
        shard_values(ValueTable(N, D), "diagonal")


@pytest.mark.parametrize("sharding", ["column", "row"])
def test_the_example_runs_under_torchrun(sharding):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), sharding],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("output matches the whole table: True") == 2, done.stdout


def every_kind_model(sparse: bool) -> Transformer:
    """A model with every sharded store (a Memory+ pool read by two layers, engram's table, PEER's experts,
    UltraMem's expansion), dense or row-sparse values, from seed 0."""
    options = {"n_keys": 8, "heads": 2, "topk": 4, "sparse_values": sparse, "query_norm": "batchnorm"}
    cfg = ModelConfig(
        vocab_size=50, dim=32, n_layers=5, n_heads=2, max_seq_len=16,
        memories=[
            MemorySpec("1,3", pool="values", options=options),
            MemorySpec("2", preset="peer", options={"n_keys": 6, "heads": 2, "topk": 3, "sparse_values": sparse}),
            MemorySpec("0", preset="engram", mode="beside",
                        options={"hash_heads": 2, "d_ngram": 8, "table_size": 61, "sparse_values": sparse}),
            MemorySpec("4", preset="ultramem",
                       options={"n_keys": 8, "heads": 2, "topk": 4, "expansion": 2, "sparse_values": sparse}),
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    return Transformer(cfg)


def _parallel_matches_one_process(rank, world, memory, sharding, sparse):
    """``parallelize``: FSDP2 data parallelism over every rank, value tables sharded over memory groups (or
    not), a replicated store (PEER's experts) and batch-norm statistics over every rank's tokens. The global
    loss, each rank's logits, every gradient (the dense ones assembled from FSDP2's shards, the value
    shards' own) and the clipping norms equal one process's on the whole batch."""
    from memlayers.distributed import parallelize
    from memlayers.optim import clip_grad_norms
    from memlayers.optim.groups import value_parameters

    model = every_kind_model(sparse)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, :3] = -100  # padding: the ranks hold different numbers of targets
    out = ref(x, y)
    (out.loss + out.aux_loss).backward()  # (UltraMem's core penalty)
    ref_grads = {n: p.grad.to_dense() for n, p in ref.named_parameters() if p.grad is not None}
    ref_norms = clip_grad_norms(ref, None, None)

    plan = parallelize(model, memory, sharding)
    rows = plan.batch_rows(x.shape[0])
    mine = model(x[rows], y[rows])
    share = (y[rows] != -100).sum() / (y != -100).sum()  # this rank's part of the global mean
    (mine.loss * share + mine.aux_loss / world).backward()  # (the same penalty on every rank)
    plan.reduce_value_grads()
    loss = (mine.loss * share).detach()
    dist.all_reduce(loss)
    assert rel_err(loss, out.loss) < 1e-5
    assert rel_err(mine.logits, out.logits[rows]) < 1e-5
    stores = [m for m in model.modules() if isinstance(m, ShardedStore)]
    shards = {id(p): m for m in stores for p in m.param_roles()["values"]}
    values = {id(p) for p in value_parameters(model)}
    assert len(stores) == (4 if memory > 1 else 0)  # the Memory+ pool, engram's table, PEER's experts, UltraMem's V
    for name, p in model.named_parameters():
        expected = ref_grads.get(name)
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if id(p) in shards and expected is not None:  # this rank's part of one process's gradient
            expected = shards[id(p)].part(expected, p)
        if expected is None or not expected.any():
            assert grad is None or not grad.to_dense().any(), name
        else:
            assert grad.is_sparse == (sparse and id(p) in values), name
            # (a query bias under batch norm has a gradient of 0 up to rounding: compare those absolutely)
            assert rel_err(grad.to_dense(), expected) < 1e-5 or expected.abs().max() < 1e-8, name
    norms = clip_grad_norms(model, None, None, norm_fn=plan.grad_norm)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(norms, ref_norms))


@pytest.mark.parametrize(
    "world, memory, sharding, sparse",
    [(2, 1, "column", False), (2, 2, "column", True), (4, 2, "row", False), (4, 2, "column", True)],
    ids=["data-parallel", "memory-parallel-sparse", "both-rows", "both-columns-sparse"],
)
def test_parallelized_model_matches_one_process(world, memory, sharding, sparse):
    run(world, _parallel_matches_one_process, memory, sharding, sparse)


def _mixed_precision_matches_one_process(rank, world):
    from memlayers.distributed import parallelize

    # no memory: its top-k on bf16 queries picks other slots than on fp32 ones (as under autocast in one
    # process), which would hide what is tested here, the bf16 parameters and the fp32 reduction
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    out = ref(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    plan = parallelize(model, 1, mixed_precision=True)
    rows = plan.batch_rows(2 * world)
    mine = model(tokens[rows, :-1], tokens[rows, 1:])
    assert mine.logits.dtype == torch.bfloat16  # the blocks ran on bf16 parameters
    (mine.loss / world).backward()
    loss = (mine.loss / world).detach().float()
    dist.all_reduce(loss)
    assert rel_err(loss, out.loss) < 1e-2
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        grad = p.grad.full_tensor()
        assert grad.dtype == torch.float32 and rel_err(grad, q.grad) < 3e-2, name  # reduced in fp32 (measured ~1e-2)


def test_parallelize_in_bf16_mixed_precision():
    """``mixed_precision=True``: FSDP2 runs the blocks on bf16 parameters and reduces fp32 gradients; loss and
    gradients equal one fp32 process's up to bf16 rounding."""
    run(2, _mixed_precision_matches_one_process)


def _whole(state: dict) -> dict:
    """A named state's tensors as whole tensors (collective for DTensors)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


def _train_and_save(rank, world, memory, sharding, out):
    from memlayers.distributed import parallelize
    from memlayers.optim import build_optimizer
    from memlayers.train.sharded_checkpoint import named_state, save_sharded

    model = every_kind_model(True)
    plan = parallelize(model, memory, sharding)
    optimizer = build_optimizer(model, lr=1e-2, value_optimizer="sparse_adam")
    tokens = torch.randint(0, 50, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    rows = plan.batch_rows(tokens.shape[0])
    for _ in range(2):
        model(tokens[rows, :-1], tokens[rows, 1:]).loss.backward()
        plan.reduce_value_grads()
        optimizer.step()
        optimizer.zero_grad()
    meta = {"config": {}, "step": 2, "tokens": 0, "rng": {}, "usage": {}, "trainer": {}}
    save_sharded(Path(out), meta if rank == 0 else None, model, optimizer, plan)
    expected = _whole(named_state(model, optimizer, plan))
    if rank == 0:
        torch.save(expected, Path(out) / "expected.pt")


def _load_and_compare(rank, world, memory, sharding, out):
    from memlayers.distributed import parallelize
    from memlayers.optim import build_optimizer
    from memlayers.train import read_checkpoint
    from memlayers.train.sharded_checkpoint import load_sharded, named_state

    model = every_kind_model(True)
    plan = parallelize(model, memory, sharding)
    optimizer = build_optimizer(model, lr=1e-2, value_optimizer="sparse_adam")
    load_sharded(read_checkpoint(out), model, optimizer, plan)
    loaded = _whole(named_state(model, optimizer, plan))
    expected = torch.load(Path(out) / "expected.pt", weights_only=True)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value) if torch.is_tensor(value) else loaded[key] == value, key


def test_sharded_checkpoint_loads_exactly_in_other_layouts(tmp_path):
    """Saved by 4 ranks (memory groups of 2, by rows; SparseRowAdam and FSDP2's AdamW state): loaded bit for bit
    by 2 ranks by columns, by 2 data-parallel ranks, and in one process."""
    from memlayers.distributed import OneProcess
    from memlayers.optim import build_optimizer
    from memlayers.train import read_checkpoint
    from memlayers.train.sharded_checkpoint import load_sharded, named_state

    run(4, _train_and_save, 2, "row", str(tmp_path))
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in torch.load(tmp_path / "expected.pt"))
    for memory, sharding in ((2, "column"), (1, "row")):
        run(2, _load_and_compare, memory, sharding, str(tmp_path))
    model = every_kind_model(True)
    optimizer = build_optimizer(model, lr=1e-2, value_optimizer="sparse_adam")
    plan = OneProcess()
    load_sharded(read_checkpoint(tmp_path), model, optimizer, plan)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    for key, value in named_state(model, optimizer, plan).items():
        assert torch.equal(value, expected[key]) if torch.is_tensor(value) else value == expected[key], key


def _fused_matches_one_process(rank, world, memory, sharding):
    """The fused value update (applied from the backward's pieces, no value gradient) on many processes: each
    replica's pieces gathered, the tables after a step and the update's norm equal one process's."""
    from memlayers.distributed import parallelize
    from memlayers.optim import build_optimizer
    from memlayers.optim.groups import value_parameters

    cfg = ModelConfig(
        vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16,
        memories=[
            MemorySpec("1,3", pool="values", options={"n_keys": 8, "heads": 2, "topk": 4}),
            MemorySpec("0", preset="engram", mode="beside", options={"hash_heads": 2, "d_ngram": 8, "table_size": 61}),
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ref_opt = build_optimizer(ref, lr=1e-2, value_optimizer="sparse_adam", fused_values=True)
    ref(x, y).loss.backward()  # the update runs in the backward
    ref_opt.step()
    ref_norm = ref_opt.optimizers[-1].grad_norm()

    plan = parallelize(model, memory, sharding)
    optimizer = build_optimizer(model, lr=1e-2, value_optimizer="sparse_adam", fused_values=True)
    rows = plan.batch_rows(x.shape[0])
    with optimizer.accumulate():  # on many processes: collected, gathered, applied by step()
        (model(x[rows], y[rows]).loss / world).backward()
    plan.reduce_value_grads(optimizer)
    optimizer.step()
    assert rel_err(plan.update_norm(optimizer.optimizers[-1].applied()), ref_norm) < 1e-5
    shards = {id(p): m for m in model.modules() if isinstance(m, ShardedStore) for p in m.param_roles()["values"]}
    assert len(shards) == (2 if memory > 1 else 0)
    expected, values = dict(ref.named_parameters()), {id(p) for p in value_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in values:
            whole = expected[name].detach()
            assert rel_err(p.detach(), shards[id(p)].part(whole, p) if id(p) in shards else whole) < 1e-5, name


@pytest.mark.parametrize(
    "world, memory, sharding", [(2, 1, "column"), (2, 2, "row"), (4, 2, "column")], ids=["dp", "rows", "both"]
)
def test_fused_value_update_on_many_processes(world, memory, sharding):
    run(world, _fused_matches_one_process, memory, sharding)


def _moe_matches_one_process(rank, world):
    """MoE's load-balancing loss under ``parallelize`` is one process's on the whole batch (slot counts and
    router probabilities summed over the ranks), and so are the router's gradients."""
    from memlayers.distributed import parallelize
    from memlayers.model.config import MoESpec

    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=16,
                      moe=MoESpec(layers="1", experts=4, topk=2, hidden=16))  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    out = ref(x, y)
    (out.loss + out.aux_loss).backward()
    plan = parallelize(model)
    rows = plan.batch_rows(x.shape[0])
    mine = model(x[rows], y[rows])
    assert rel_err(mine.aux_loss, out.aux_loss) < 1e-6  # the global balance loss, on every rank
    (mine.loss / world + mine.aux_loss / world).backward()
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor()
        assert rel_err(grad, dict(ref.named_parameters())[name].grad) < 1e-5, name


def test_moe_balance_loss_over_every_process():
    run(2, _moe_matches_one_process)
