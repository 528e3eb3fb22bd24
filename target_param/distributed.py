"""The reference batch sharded across the ranks of a ``torch.distributed`` process group, exactly.

``to_target_space(model, shard, process_group=group)``: rank r holds a shard ``X̄_r`` of the reference batch
(shards concatenate along dim 0 in rank order; they may be uneven) and the targets of its rows, ``T_j,r``.
Eq. 7 needs the patterns only through sums over columns, so each solve sums them over the group (one
all-reduce of ``[G, B]``, :meth:`Shards.sum_`):

    G_j = Σ_r X_rᵀX_r,   B_j = Σ_r X_rᵀY_r,   Wᵀ_j = (G_j + λI)⁻¹ B_j,   S_j,r = X_r Wᵀ_j

with ``X_r = A[0:j),rᵀ`` and ``Y_r = T_j,rᵀ`` (patterns as rows, see ``solver``). Every rank solves the same
weights, those of one process holding the concatenated shards. Algorithm 3's backward needs one more sum per
solve, ``Ŵ + XᵀŜ`` over the group (``solver._Ridge``, ``layers._ConvRidge``); the rest is local:
``dL/dY_r = X_r Z`` and ``dL/dX_r = (Y_r − S_r)Zᵀ + (Ŝ_r − X_r Z)Wᵀ`` with ``Z = K⁻¹ Σ_r (Ŵ_r + X_rᵀŜ_r)``.
Each rank's target gradient is then that of the sum of every rank's loss; :func:`scaled` divides it by the
world size, as DistributedDataParallel averages replicated gradients, so that training equals one process on
the concatenated reference batch and minibatch with a mean loss.

Sharded solves always take the primal form (eq. 7). The dual form (eq. 23) factorises ``XXᵀ``, whose entries
pair every column with every other: sharded, it needs every rank's patterns (an all-gather of X and an N × N
Gram on every rank, growing with the world size), while the primal sums are d × d and d × o whatever the world
size. Both give the same W (Woodbury); where ``d_in + 1`` exceeds the total columns, the primal Gram is
singular without λ, so sharding needs ``lam > 0`` there.

Two collectives per converted layer and step (forward and backward), on the conversion's process group. A
forward of a sharded model is therefore collective: every rank of the group must run it, in the same order
(as with FSDP). Conversion is collective too; its checks, before anything changes, have a timeout
(:data:`CHECK_TIMEOUT`): identical options and weights on every rank, shards that agree in every dimension
but the first, no empty shard (:class:`~target_param.errors.ShardError`).
"""
from __future__ import annotations

import datetime
import hashlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ShardError
from .registry import REALISER_ATTR, realisers

__all__ = ["Shards", "CHECK_TIMEOUT", "scaled", "anchor_for", "gather_state_dict", "sharded_names"]

CHECK_TIMEOUT = datetime.timedelta(seconds=120)  # for the collectives of conversion's checks
_MAX_DIMS = 8  # reference-batch dimensions compared across ranks


class Shards:
    """The process group of a sharded conversion: its collectives and its checks."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise ShardError(
                "process_group needs torch.distributed to be initialised.",
                "Call torch.distributed.init_process_group(...) on every rank first, or pass process_group=None "
                "(the whole reference batch on this process).",
                process_group=group,
            )
        try:
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        except (RuntimeError, ValueError) as e:
            raise ShardError("process_group is not a process group of this process.",
                             "Pass dist.group.WORLD or a group from dist.new_group that contains this rank.",
                             process_group=group, error=str(e)) from None
        if self.rank < 0:
            raise ShardError("This process is not a member of process_group.",
                             "Convert on the ranks of the group only.", process_group=group)
        self.group = group

    def __deepcopy__(self, memo):
        return self  # a process group is shared, not copied

    # ---------------------------------------------------------------- the solves' sums
    def sum_(self, *tensors: Tensor) -> None:
        """Sum ``tensors`` over the group, in place, in one all-reduce (none in a group of one)."""
        if self.world == 1:
            return
        if len(tensors) == 1 and tensors[0].is_contiguous():
            dist.all_reduce(tensors[0], group=self.group)
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()

    # ---------------------------------------------------------------- conversion's checks
    def _gather(self, x: Tensor, what: str) -> list[Tensor]:
        """All-gather of equal-shaped tensors, with :data:`CHECK_TIMEOUT`."""
        out = [torch.empty_like(x) for _ in range(self.world)]
        self._wait(dist.all_gather(out, x, group=self.group, async_op=True), what)
        return out

    def check(self, model: nn.Module, inputs: tuple, options: dict) -> None:
        """Before anything changes: identical options and weights on every rank; reference shards that agree
        in every dimension but the first; none empty. Raises the same :class:`ShardError` on every rank."""
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        params = [(n, p) for n, p in model.named_parameters()]
        device = _device(self.group)
        header = torch.tensor([len(inputs), len(tensors), len(params), _digest(repr(sorted(options.items())))],
                              dtype=torch.int64, device=device)
        heads = torch.stack(self._gather(header, "the arguments")).cpu()
        for r in range(self.world):
            if not torch.equal(heads[r, :3], heads[0, :3]):
                raise ShardError(
                    "Every rank must convert the same model with the same number of reference inputs.",
                    "Build the model identically on every rank and pass one shard of the same inputs.",
                    **{f"rank {q} (inputs, tensors, parameters)": tuple(heads[q, :3].tolist()) for q in (0, r)})
            if heads[r, 3] != heads[0, 3]:
                raise ShardError(
                    "Every rank must convert with the same options (lam, init, cascade, ...): each solve is "
                    "shared, so its λ and form must be.",
                    "Pass the same keyword arguments to to_target_space on every rank.",
                    ranks=(0, r), **{f"rank {self.rank} options": options})
        meta = torch.full((len(tensors), _MAX_DIMS + 2), -1, dtype=torch.int64)
        for k, x in enumerate(tensors):
            shape = tuple(x.shape) if x.dim() else (1,)
            meta[k, 0], meta[k, 1] = x.dim(), _digest(str(x.dtype))
            meta[k, 2:2 + min(len(shape), _MAX_DIMS)] = torch.tensor(shape[:_MAX_DIMS])
        fingerprints = torch.tensor([_digest_tensor(p) for _, p in params], dtype=torch.int64)
        sums = torch.tensor([float(p.detach().double().sum()) for _, p in params], dtype=torch.float64)
        mine = torch.cat([meta.reshape(-1), fingerprints, sums.view(torch.int64)]).to(device)
        every = [t.cpu() for t in self._gather(mine, "the reference shards and weights")]
        n_meta = meta.numel()
        metas = [t[:n_meta].reshape(meta.shape) for t in every]
        where = [f"ref_batch[{k}]" if len(inputs) > 1 else "ref_batch" for k in range(len(tensors))]
        for k in range(len(tensors)):
            for r in range(self.world):
                if metas[r][k, 2] == 0 or (metas[r][k, 0] == 0):
                    raise ShardError(
                        f"Rank {r}'s shard of {where[k]} is empty; every rank needs n̄_r ≥ 1 reference patterns.",
                        "Split the reference batch so that every rank gets at least one row, or use fewer ranks.",
                        rank=r, **{f"{where[k]}.shape on rank {r}": _shape(metas[r][k])})
                if not torch.equal(metas[r][k, :2], metas[0][k, :2]) or \
                        not torch.equal(metas[r][k, 3:], metas[0][k, 3:]):
                    raise ShardError(
                        f"The shards of {where[k]} must agree in every dimension but the first (they concatenate "
                        "along dim 0, in rank order), and in dtype.",
                        "Shard the reference batch along dim 0 only.",
                        **{f"{where[k]}.shape on rank 0": _shape(metas[0][k]),
                           f"{where[k]}.shape on rank {r}": _shape(metas[r][k])})
        n = len(params)
        for r in range(1, self.world):
            same = every[r][n_meta:n_meta + n] == every[0][n_meta:n_meta + n]
            if not bool(same.all()):
                k = int((~same).nonzero()[0])
                values = every[0][n_meta + n:].view(torch.float64), every[r][n_meta + n:].view(torch.float64)
                raise ShardError(
                    f"Every rank must hold identical weights before conversion: parameter '{params[k][0]}' "
                    f"differs between rank 0 and rank {r} (the solves are shared, so the weight-space "
                    "parameters must be replicated).",
                    "Seed the model's initialisation identically on every rank, or load the same checkpoint "
                    "everywhere, before converting.",
                    parameter=params[k][0], ranks=(0, r), **{f"sum on rank {q}": float(values[i][k])
                                                             for i, q in ((0, 0), (1, r))},
                    differing=int((~same).sum()))

    def agree(self, error: BaseException | None, layers: str) -> None:
        """Whether every rank planned without an error, and the same converted ``layers`` (their names, in
        order). Raises :class:`ShardError` on the ranks without an error of their own when another rank failed
        (that rank raises its own), or on every rank when the layers differ."""
        mine = torch.tensor([error is not None, _digest(layers)], dtype=torch.int64, device=_device(self.group))
        every = [t.cpu() for t in self._gather(mine, "the planning pass")]
        ranks = [r for r, t in enumerate(every) if bool(t[0])]
        if ranks:
            if error is None:
                raise ShardError("Conversion failed on another rank of process_group; nothing was changed here.",
                                 "Read the error raised on the rank(s) below.", ranks=tuple(ranks))
            return
        differ = [r for r, t in enumerate(every) if t[1] != every[0][1]]
        if differ:
            raise ShardError(
                "The converted layers must be the same on every rank, but some layers run on the reference "
                "shard of one rank and not on another's (a data-dependent path).",
                "Exclude such layers with filter_fn, or give every rank a shard that reaches every layer.",
                ranks=(0, differ[0]), **{f"layers on rank {self.rank}": layers})

    def share(self, plan, rows: int) -> None:
        """Every planned layer's statistics over the whole reference batch (the checks of conversion and
        ``lam_mode="relative"`` then see the global Gram): its column energies and problem columns, summed
        over the group; and each target's layout (``layout``: where this rank's reference patterns lie in it),
        refused by name where it has none."""
        parts, bad = [], []
        for pl in plan.layers:
            pl.layouts = {n: layout(t, rows, pl.module) for n, t in (pl.sums or {}).items()}
            bad.append(float(any(v is None for v in pl.layouts.values())))
            for name, (e, _) in (pl.energy or {}).items():
                parts.append(e.double().sum(0))
            parts.append(torch.tensor([float(c) for _, c, _, _ in pl.adapter.problems(pl.sums)]
                                      if pl.sums else [], dtype=torch.float64))
        flat = torch.cat([torch.tensor(bad, dtype=torch.float64)] + [p.reshape(-1).cpu() for p in parts])
        flat = flat.to(_device(self.group))
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._wait(work, "the plan's statistics")
        flat = flat.cpu()
        flagged = [pl.name for pl, b in zip(plan.layers, flat[:len(bad)].tolist()) if b]
        if flagged:
            raise ShardError(
                "A sharded conversion needs every layer's target sharded like the reference batch: its first "
                "dimension the reference patterns (batch-first inputs), or nn.MultiheadAttention's sequence-first "
                "layout.",
                "Use batch_first=True layers, or exclude the layers below with filter_fn.",
                layers=flagged)
        start = len(bad)
        for pl in plan.layers:
            energy = {}
            for name, (e, rows_) in (pl.energy or {}).items():
                g = e.shape[1]
                energy[name] = (flat[start:start + g].reshape(1, g).to(e.dtype), rows_)
                start += g
            pl.energy = energy or pl.energy
            problems = pl.adapter.problems(pl.sums) if pl.sums else []
            cols = flat[start:start + len(problems)].tolist()
            start += len(problems)
            pl.shared = [(r, int(c), g, o) for (r, _, g, o), c in zip(problems, cols)]

    def _wait(self, work, what: str) -> None:
        """Wait for a collective of conversion's checks, at most :data:`CHECK_TIMEOUT`."""
        try:
            done = work.wait(timeout=CHECK_TIMEOUT)
        except Exception as e:  # (gloo raises on timeout, NCCL may return False)
            done = str(e) or type(e).__name__
        if done is not True and done is not None:
            raise ShardError(
                f"A rank of process_group did not join the check of {what} within {CHECK_TIMEOUT}: conversion "
                "is collective.",
                "Call to_target_space with the same arguments on every rank of the group.",
                rank=self.rank, world_size=self.world, error=done)


def layout(target: Tensor, rows: int, module: nn.Module) -> tuple[str, int] | None:
    """Where a target holds this rank's ``rows`` reference patterns, so that shards concatenate: ``("dim0", 1)``
    (batch first: the targets of every module but attention's), ``("dim1", L)`` (nn.MultiheadAttention's
    in-projection, computed sequence first on (L, n̄, E) whatever ``batch_first``), ``("flat", L)`` (its
    out-projection, on the (L·n̄, E) flattening), or None."""
    if target.dim() == 0:
        return None
    if isinstance(module, (nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear)):
        if target.dim() >= 3 and target.shape[1] == rows:
            return "dim1", target.shape[0]
        if target.dim() == 2 and target.shape[0] % rows == 0:
            return "flat", target.shape[0] // rows
        return None
    return ("dim0", 1) if target.shape[0] == rows else None


def concatenated(parts: list[Tensor], layout: tuple[str, int]) -> Tensor:
    """Every rank's target, in rank order, as one process holding the concatenated reference batch has it."""
    mode, lead = layout
    if mode == "dim0":
        return torch.cat(parts)
    if mode == "dim1":
        return torch.cat(parts, 1)
    joined = torch.cat([p.reshape(lead, -1, *p.shape[1:]) for p in parts], 1)
    return joined.reshape(-1, *parts[0].shape[1:])


def _device(group) -> torch.device:
    """The device the group's collectives take tensors on."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shape(meta: Tensor) -> tuple:
    dims = int(meta[0])
    return tuple(int(v) for v in meta[2:2 + min(dims, _MAX_DIMS)])


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _digest_tensor(t: Tensor) -> int:
    """A 56-bit hash of a tensor's bytes (any dtype): equal on two ranks iff the values are, but by chance."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


class _Scale(torch.autograd.Function):
    """The identity on ``t``, whose backward multiplies by ``factor``; ``anchor`` gets a zero gradient."""

    @staticmethod
    def forward(ctx, t, factor, anchor):
        ctx.factor, ctx.anchor = factor, anchor is not None
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, (grad.new_zeros(0) if ctx.anchor else None)


ANCHOR = "target_space_anchor"
LAYOUTS = "_target_space_shard_layouts"  # on a sharded root: target name → its ``layout``


def anchor_for(root: nn.Module, ignored: list[str]) -> nn.Parameter | None:
    """A 0-element Parameter for a sharded root none of whose trainable parameters is replicated (every one a
    target): DistributedDataParallel refuses a module without a parameter to all-reduce, so the root gets one,
    ``target_space_anchor``, which takes a zero-size gradient from every reference pass (``scaled``)."""
    skip = set(ignored)
    if any(p.requires_grad for n, p in root.named_parameters() if n not in skip):
        return None
    p = next(root.parameters())
    return nn.Parameter(p.new_zeros(0))


def scaled(t: Tensor, shards: Shards, anchor: Tensor | None = None) -> Tensor:
    """A target as the reference pass reads it, its gradient divided by the world size (see the module
    docstring); ``anchor`` (``anchor_for``) joins the graph."""
    if not (t.requires_grad and torch.is_grad_enabled()) or (shards.world == 1 and anchor is None):
        return t
    return _Scale.apply(t, 1.0 / shards.world, anchor)


# ------------------------------------------------------------------------------------------ state
def sharded_names(model: nn.Module) -> list[str]:
    """The qualified names, in ``model``, of its sharded tensors: every converted root's targets and
    reference buffer(s). DistributedDataParallel must neither all-reduce nor broadcast them; a converted
    root lists its own as ``_ddp_params_and_buffers_to_ignore``."""
    out = []
    for prefix, m in model.named_modules():
        for name in m.__dict__.get("_ddp_params_and_buffers_to_ignore", ()) if _sharded_root(m) else ():
            out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _sharded_root(m: nn.Module) -> bool:
    r = m.__dict__.get(REALISER_ATTR)
    return r is not None and r.shards is not None


def gather_state_dict(model: nn.Module, dst: int = 0) -> dict[str, Tensor] | None:
    """The state_dict of the equivalent single-process model, on rank ``dst`` of the conversion's group.

    Every rank must call it (it is collective). Each sharded tensor, the targets and the reference batch,
    is concatenated along dim 0 in rank order; every other entry is rank ``dst``'s own (they are
    replicated). The result loads into a model converted on one process with the concatenated reference
    batch (``load_state_dict``), which then computes the same function.

    Args:
        model: a model converted with ``process_group`` (or a DistributedDataParallel wrapping one).
        dst: the group rank that receives the state_dict.

    Returns:
        On rank ``dst`` the full state_dict, its tensors on the CPU; None on every other rank.

    Raises:
        NotConvertedError: nothing in ``model`` was converted with a process group.

    Example (on every rank of a group, after ``to_target_space(model, shard, process_group=group)``)::

        state = tp.gather_state_dict(model)
        if dist.get_rank() == 0:
            torch.save(state, "full.pt")  # loads into tp.to_target_space(copy, full_reference)
    """
    from .errors import NotConvertedError

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    roots = [r for r in realisers(model) if r.shards is not None]
    if not roots:
        raise NotConvertedError("The model has nothing converted with a process_group: it is not sharded.",
                                "Use model.state_dict() for a model converted on one process.",
                                model=type(model).__name__)
    shards = roots[0].shards
    sharded = set(sharded_names(model))
    state = model.state_dict()
    local = {k: v.detach().cpu() for k, v in state.items() if k in sharded}
    gathered = [None] * shards.world
    dist.all_gather_object(gathered, local, group=shards.group)
    if shards.rank != dst:
        return None
    layouts = {}
    for prefix, m in model.named_modules():
        for name, lay in m.__dict__.get(LAYOUTS, {}).items():
            layouts[f"{prefix}.{name}" if prefix else name] = lay
    out = {}
    for k, v in state.items():
        if k.rsplit(".", 1)[-1] != ANCHOR:  # (no anchor in one process)
            out[k] = concatenated([g[k] for g in gathered], layouts.get(k, ("dim0", 1))) if k in sharded \
                else v.detach().cpu()
    return out
