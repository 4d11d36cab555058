"""LoRA factors sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): which parameters are
sharded, each rank's block of rows, and the few collectives hlora needs.

FSDP2 shards every parameter on dim 0 with `torch.chunk` semantics: B (out, r) becomes a block of
whole rows per rank (ceil(out / world) rows, the last ranks fewer, possibly none) and A (r, in) a
block of its r rows. hlora keeps ω, Ω and B_ref as the same row block as B: every term of the ω
update and of the penalty's D = s·(B·A − B_ref·A_ref) restricted to those rows needs only the local
rows of B and the whole A (r × in, small), which is gathered. No rank ever holds a whole Ω.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

try:  # public from torch 2.5; torch 2.4 has it under _tensor
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]


@dataclass(frozen=True)
class RowBlock:
    """This rank's rows `start:stop` of a matrix of `rows` rows, in `group`."""

    start: int
    stop: int
    rows: int
    group: Any  # the process group of the mesh dimension the rows are sharded over

    @property
    def count(self) -> int:
        return self.stop - self.start


def is_sharded(t: Any) -> bool:
    return isinstance(t, DTensor)


def chunk_bounds(rows: int, world: int, rank: int) -> tuple:
    """`torch.chunk`'s rows for `rank`: ceil(rows / world) each, the last ranks fewer or none."""
    size = -(-rows // world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def row_block(t: Any, name: str) -> Optional[RowBlock]:
    """The row block this rank holds of a parameter FSDP2 sharded on dim 0 over one mesh
    dimension; None for a plain tensor. Anything else (2-D meshes, other placements) is refused:
    hlora supports FSDP2's default sharding."""
    if not is_sharded(t):
        return None
    placements = tuple(t.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"{name} is a DTensor with placements {placements}; hlora supports parameters sharded "
                         "on dim 0 over one mesh dimension (FSDP2's fully_shard default)")
    mesh = t.device_mesh
    group = mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rows = t.shape[0]
    start, stop = chunk_bounds(rows, world, rank)
    local = t.to_local().shape[0]
    if local != stop - start:
        raise ValueError(f"{name}: this rank holds {local} rows of {rows}, not torch.chunk's {stop - start}; "
                         "hlora supports FSDP2's even-chunk sharding")
    return RowBlock(start, stop, rows, group)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds (the tensor itself when not sharded). Differentiable."""
    return t.to_local() if is_sharded(t) else t


def local_data(t: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds, detached (the tensor itself when not sharded); for a DTensor
    without going through autograd (``to_local()`` makes a graph node each call)."""
    if not is_sharded(t):
        return t.detach()
    inner = getattr(t, "_local_tensor", None)
    return inner.detach() if isinstance(inner, torch.Tensor) else t.to_local().detach()


def _gather_rows(pieces: Sequence[torch.Tensor], wholes: Sequence[tuple], group: Any,
                 flag: Optional[bool] = None) -> Tuple[List[torch.Tensor], Optional[bool]]:
    """Whole tensors from each rank's torch.chunk rows (``pieces``, of tensors shaped ``wholes``)
    with one all-gather: the rows padded to the chunk size, concatenated, gathered, cut apart.
    ``flag`` rides along; the second result says whether it holds on every rank."""
    world = dist.get_world_size(group)
    flat_pieces, layout = [], []
    for piece, whole in zip(pieces, wholes):
        size = -(-whole[0] // world) if whole[0] else 0
        width = int(torch.Size(whole[1:]).numel())
        flat_pieces += [piece.reshape(-1), piece.new_zeros(size * width - piece.numel())]
        layout.append((whole, size, width, piece.dtype))
    if flag is not None:
        flat_pieces.append(flat_pieces[0].new_full((1,), 1.0 if flag else 0.0))
    flat = torch.cat(flat_pieces)  # mixed dtypes promote (bf16/fp16 → fp32 exactly) and are cast back
    flats = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(flats, flat, group=group)
    out, offset = [], 0
    for whole, size, width, dtype in layout:
        rows = []
        for r in range(world):
            start, stop = chunk_bounds(whole[0], world, r)
            rows.append(flats[r][offset:offset + (stop - start) * width])
        out.append(torch.cat(rows).reshape(whole).to(dtype))
        offset += size * width
    agreed = None if flag is None else all(bool(f[-1] == 1) for f in flats)
    return out, agreed


def gathered_many(tensors: Sequence[Optional[torch.Tensor]], *,
                  all_of: Optional[bool] = None) -> Tuple[List[Optional[torch.Tensor]], Optional[bool]]:
    """Each tensor whole on every rank — plain tensors as they are, the sharded ones (DTensors on
    one mesh dimension, dim 0) with one all-gather for all of them. Not differentiable (the
    recorder's snapshots). With ``all_of`` (a flag of this rank's), also whether it holds on every
    rank, carried in the same collective (else None)."""
    out: List[Optional[torch.Tensor]] = list(tensors)
    sharded = [i for i, t in enumerate(tensors) if t is not None and is_sharded(t)]
    if not sharded:
        return out, all_of
    group = tensors[sharded[0]].device_mesh.get_group()
    wholes, agreed = _gather_rows([local_data(tensors[i]) for i in sharded],
                                  [tuple(tensors[i].shape) for i in sharded], group, all_of)
    for i, whole in zip(sharded, wholes):
        out[i] = whole
    return out, agreed


class _GatheredRows(torch.autograd.Function):
    """Whole factors from each rank's rows in one all-gather; on the way back, each rank's partial
    gradients of the whole factors summed over the ranks in one all-reduce, each keeping its rows.
    (Per factor, ``full_tensor(grad_placements=[Partial()])`` costs one collective each way.)"""

    @staticmethod
    def forward(ctx, group: Any, wholes: tuple, *pieces: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.group, ctx.wholes = group, wholes
        return tuple(_gather_rows([p.detach() for p in pieces], wholes, group)[0])

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple:
        group, wholes = ctx.group, ctx.wholes
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ref = next(g for g in grads if g is not None)
        dtype = torch.promote_types(ref.dtype, torch.float32)  # bf16/fp16 partials summed in fp32
        flat = torch.cat([(g if g is not None else ref.new_zeros(w)).reshape(-1).to(dtype)
                          for g, w in zip(grads, wholes)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out, offset = [], 0
        for whole in wholes:
            n = int(torch.Size(whole).numel())
            start, stop = chunk_bounds(whole[0], world, rank)
            out.append(flat[offset:offset + n].reshape(whole)[start:stop].to(ref.dtype))
            offset += n
        return (None, None, *out)


def gathered_differentiable(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Each tensor whole on every rank, differentiable: a sharded one's gradient — a different
    partial on each rank, since each rank's penalty covers its own rows — is summed over the
    ranks on the way back (what ∂P/∂A needs). One collective each way for all of them."""
    out = list(tensors)
    sharded = [i for i, t in enumerate(tensors) if is_sharded(t)]
    if not sharded:
        return out
    group = tensors[sharded[0]].device_mesh.get_group()
    wholes = tuple(tuple(tensors[i].shape) for i in sharded)
    # to_local() carries each rank's rows' gradient back to the DTensor parameter (Shard(0)).
    gathered = _GatheredRows.apply(group, wholes, *[tensors[i].to_local() for i in sharded])
    for i, whole in zip(sharded, gathered):
        out[i] = whole
    return out


def local_grad(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows of a parameter's gradient this rank holds (None when it has none)."""
    return None if t.grad is None else local_data(t.grad)


def group_of(blocks: Sequence[Optional[RowBlock]]) -> Any:
    """The one process group the matrices are sharded in (None: not sharded)."""
    groups = {id(b.group): b.group for b in blocks if b is not None}
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError("the adapted matrices are sharded over different process groups; hlora needs one")
    return next(iter(groups.values()))


def all_sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    """`values` summed over the ranks of `group` (in float64 on the CPU for gloo and NCCL alike)."""
    if group is None:
        return values
    device = values.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        values = values.cuda()
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(device)


def all_true(flag: bool, group: Any, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (so all ranks take the same branch)."""
    if group is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    return bool(all_sum(t, group).item() == dist.get_world_size(group))


def rank_and_world(group: Any) -> tuple:
    return (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)


def barrier(group: Any) -> None:
    if group is not None:
        dist.barrier(group=group)


def gather_objects(obj: Any, group: Any) -> List[Any]:
    if group is None:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
