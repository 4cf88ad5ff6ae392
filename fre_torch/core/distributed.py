"""Data-parallel fitting and scoring with ``torch.distributed``: sharding, exact reductions, ordered gathers.

One process per device (``torchrun``): every rank reads a contiguous shard of the image list, extracts features and
accumulates its own statistics; the statistics are then reduced exactly, so every rank solves the identical problem
and the fitted subspaces equal a single-process fit up to float64 rounding. Scores and maps are gathered back in the
original order.

- ``shard_indices(n, rank, world, unit=...)``: contiguous, balanced, increasing with rank; no image is dropped or
  duplicated (unlike ``DistributedSampler``, which pads). Shards start on multiples of the batch size when there are
  enough batches, so every rank sees exactly the batches a single process would see: the backbone's float32 kernels
  depend on the batch size, and whole batches keep the features bit-identical.
- ``reduce_accumulator(acc)``: covariance path -> one ``all_reduce`` of float64 sums taken about a common shift (rank
  0's mean), which is exact algebra and keeps the cancellation as small as Chan's pairwise update; Gram path ->
  ``all_gather`` of the (N_r, D) rows (variable N_r: counts gathered, rows padded), concatenated in rank order = the
  original order.
- ``gather_rows(t)``: the same padded ``all_gather`` for scores ``(N_r,)`` and maps ``(N_r, g, g)``.
- ``config_hash_check(settings)``: every rank compares a hash of its settings; a mismatch raises on every rank.

Nothing here does anything unless data-parallel mode is on: ``init_from_env`` (or ``enable``) turns it on; a process
group someone else created is not used on its own, so a training script that calls ``FREDetector.fit`` on one rank
of its own group never blocks in a collective it did not ask for. Every collective error (a peer that died, a
collective that timed out) is re-raised as ``DistributedError``, one line naming the rank and the stage.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .precision import FIT_DTYPE
from .sketch import SketchAccumulator
from .subspace import CovarianceAccumulator, GramAccumulator, NComponents, resolve_solver, summarises

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_KEYS",
    "ConfigMismatchError",
    "DistributedError",
    "ProcessContext",
    "barrier",
    "cleanup",
    "config_hash",
    "config_hash_check",
    "enable",
    "env_requests_distributed",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "process_context",
    "rank",
    "reduce_accumulator",
    "shard",
    "shard_indices",
    "world_size",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the slowest rank before failing. It bounds how long ranks wait for one another
(e.g. for rank 0 computing pixel metrics before the next category), so it must exceed the longest one-rank stage;
10 minutes covers the largest MVTec categories with room to spare."""

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables ``torchrun`` sets for each worker."""

_GRAM, _COVARIANCE, _SKETCH = 0, 1, 2


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on: a bad launch, a peer that died or stalled, or inconsistent ranks."""


class ConfigMismatchError(DistributedError):
    """Ranks were started with different settings or data (``config_hash_check``)."""


@dataclass(frozen=True)
class _State:
    rank: int
    world: int
    local_rank: int
    comm_device: torch.device  # where collective buffers live: the rank's GPU for NCCL, the CPU for gloo
    timeout_s: float
    owns_group: bool  # destroy the default group in ``cleanup`` only when we created it


_state: _State | None = None


# ---------------------------------------------------------------------------------------------------- set-up
def env_requests_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """True when the process was started by ``torchrun`` (all of ``ENV_KEYS`` are set)."""
    env = os.environ if environ is None else environ
    return all(k in env for k in ENV_KEYS)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedError(f"distributed mode needs {', '.join(ENV_KEYS)} in the environment (missing {name}); "
                               "launch with torchrun --nproc_per_node=N cli.py ...")
    try:
        return int(value)
    except ValueError as err:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from err


def init_from_env(device: str | torch.device = "cpu", timeout: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by the ``torchrun`` environment and turn data-parallel mode on.

    Args:
        device: ``'cpu'`` (backend gloo) or ``'cuda'`` (backend NCCL, one process per GPU: this rank uses
            ``cuda:LOCAL_RANK``).
        timeout: seconds any collective (and the initial rendezvous) may wait for the other ranks.

    Returns:
        This rank's device.

    Raises:
        DistributedError: the environment is incomplete, CUDA has fewer devices than local ranks, or the
            rendezvous failed or timed out.
    """
    global _state
    if timeout <= 0:
        raise DistributedError(f"the distributed timeout must be > 0 seconds, got {timeout}")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without --distributed")
    rank_, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT")
    if not 0 <= rank_ < world:
        raise DistributedError(f"RANK={rank_} is outside WORLD_SIZE={world}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device cuda was requested but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                                   "start at most one process per GPU (--nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed mode supports the devices cpu (gloo) and cuda (NCCL), got {dev}")
    owns = not dist.is_initialized()
    if not owns:  # a group someone else set up (e.g. a driver script): its backend decides where buffers live
        backend = dist.get_backend()
    else:
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank_, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout), **kwargs)
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"rank {rank_}: joining the process group ({backend}) failed: "
                                   f"{_first_line(err)}") from err
    _state = _State(rank_, world, local_rank, dev if backend == "nccl" else torch.device("cpu"), float(timeout), owns)
    return dev


def enable(timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Turn data-parallel mode on over an already initialised default process group (e.g. your own launcher's).

    After this, ``FREDetector.fit`` / ``calibrate`` treat their data as this rank's shard and reduce across ranks.
    """
    global _state
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("enable() needs an initialised default process group (torch.distributed."
                               "init_process_group); or call init_from_env()")
    backend = dist.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    _state = _State(dist.get_rank(), dist.get_world_size(), local, comm, float(timeout), owns_group=False)


def cleanup() -> None:
    """Leave data-parallel mode; destroy the process group if ``init_from_env`` created it. Safe to call twice."""
    global _state
    state, _state = _state, None
    if state is not None and state.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True in data-parallel mode (``init_from_env`` / ``enable`` called, group alive)."""
    return _state is not None and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return _state.rank if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return _state.world if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 and when not distributed: the process that prints and writes files."""
    return rank() == 0


def _first_line(err: BaseException) -> str:
    """The gist of a backend error: its first line, without gloo's ``[file.cc:123]`` prefix and advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return line.split(" This is typically", 1)[0].rstrip()


@contextmanager
def _collective(stage: str) -> Iterator[None]:
    """Re-raise a failed collective as one readable ``DistributedError`` naming this rank and the stage."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # DistBackendError, DistNetworkError, gloo's connection/timeout errors
        timeout = _state.timeout_s if _state is not None else DEFAULT_TIMEOUT_S
        raise DistributedError(f"{stage} failed: another rank exited, or did not get there within "
                               f"{timeout:g} s ({_first_line(err)})") from err


# Every function that runs a collective is decorated with torch.inference_mode(False), so its buffers are normal
# tensors even when the caller runs under inference mode: torch 2.4's gloo backend writes the results from its own
# thread, outside the caller's inference mode, and refuses to update inference tensors there ("Inplace update to
# inference tensor outside InferenceMode"); later versions accept either.
@torch.inference_mode(False)
def barrier(stage: str = "barrier") -> None:
    """Wait for every rank (no-op when not distributed); fails after the timeout instead of hanging."""
    if not is_distributed():
        return
    with _collective(stage):
        # A tiny all_reduce rather than dist.barrier: it honours the group timeout on every backend and needs no
        # device guess on NCCL.
        dist.all_reduce(torch.zeros(1, device=_state.comm_device))


@dataclass(frozen=True)
class ProcessContext:
    """This process's place in a job: its device, rank and world size (rank 0 of 1 when not data-parallel).

    Made by ``process_context``; the jobs of ``fre_torch.jobs.run`` take their device from it and write files only
    where ``is_main``.
    """

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0, or not data-parallel: the process that prints and writes files."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """``"rank R of W"`` in a data-parallel run, else empty."""
        return f"rank {self.rank} of {self.world}" if self.world > 1 else ""


@contextmanager
def process_context(device: str | torch.device = "cpu", *, distributed: bool | None = None,
                    timeout: float | None = None) -> Iterator[ProcessContext]:
    """Run one job in this process: join torchrun's process group if asked, yield the context, leave the group.

    Args:
        device: ``'cpu'`` or ``'cuda'``; in a data-parallel run on CUDA this rank's ``cuda:LOCAL_RANK``.
        distributed: True joins (``init_from_env``); None joins when torchrun's environment is set
            (``env_requests_distributed``); False never does.
        timeout: seconds a collective waits for the other ranks (default ``DEFAULT_TIMEOUT_S``).

    An exception raised inside a data-parallel run gets the attribute ``rank_label`` (``"rank R of W"``), so that
    each failing rank can say which it is in its one-line message. The group is left however the job ends.

    Raises:
        ValueError: ``timeout <= 0``.
        DistributedError: the launch is incomplete or the rendezvous failed.
    """
    if not (distributed or (distributed is None and env_requests_distributed())):
        yield ProcessContext(torch.device(device))
        return
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if timeout <= 0:
        raise ValueError(f"--dist_timeout must be > 0 seconds, got {timeout}")
    try:
        ctx = ProcessContext(init_from_env(device, timeout=timeout), rank(), world_size())
        try:
            yield ctx
        except BaseException as err:
            err.rank_label = ctx.label  # type: ignore[attr-defined]
            raise
    finally:
        cleanup()


# ---------------------------------------------------------------------------------------------------- sharding
def shard_indices(n: int, rank: int, world: int, *, unit: int = 1, what: str = "images") -> range:
    """The contiguous slice of ``range(n)`` that ``rank`` of ``world`` processes.

    Shards are balanced, increasing with rank, disjoint, and cover every index exactly once, so concatenating the
    ranks' results in rank order restores the original order. When the n items make at least ``world`` groups of
    ``unit`` (the batch size), shard boundaries fall on multiples of ``unit``: each rank then sees exactly the batches
    a single process would, which keeps the features bit-identical (float32 kernels depend on the batch size).
    Otherwise shards are balanced single items (sizes differ by at most one).

    Raises:
        ValueError: ``world > n`` (a rank would get nothing), or a bad rank/world/unit.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} process(es)")
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    if n < world:
        raise ValueError(f"world size {world} is larger than the {n} {what}: every process needs at least one; "
                         f"start at most {n} process(es)")
    units = -(-n // unit)
    if units < world:
        unit, units = 1, n
    # Floor division of r * units / world gives sizes differing by at most one unit, all >= 1 because units >= world.
    start = (rank * units // world) * unit
    stop = min(((rank + 1) * units // world) * unit, n)
    return range(start, stop)


def shard(items: Sequence[T], *, unit: int = 1, what: str = "images") -> list[T]:
    """This rank's contiguous shard of ``items`` (see ``shard_indices``); all of them when not distributed."""
    if not is_distributed():
        return list(items)
    return [items[i] for i in shard_indices(len(items), rank(), world_size(), unit=unit, what=what)]


# ---------------------------------------------------------------------------------------------------- gathers
@torch.inference_mode(False)  # see barrier
def _all_gather_ints(values: Sequence[int], stage: str) -> Tensor:
    """Each rank's small int vector ``(K,)`` -> ``(world, K)`` int64 on the CPU (one tiny collective)."""
    local = torch.tensor(list(values), dtype=torch.int64, device=_state.comm_device)
    out = [torch.empty_like(local) for _ in range(_state.world)]
    with _collective(stage):
        dist.all_gather(out, local)
    return torch.stack(out).cpu()


@torch.inference_mode(False)  # see barrier
def gather_rows(local: Tensor, counts: Sequence[int] | None = None, *, stage: str = "gathering results") -> Tensor:
    """Concatenate every rank's ``local: (N_r, ...)`` in rank order -> ``(sum N_r, ...)`` on ``local``'s device.

    With the contiguous shards of ``shard_indices`` rank order is the original order. Row counts may differ
    between ranks: they are gathered first (or passed as ``counts``), and rows are padded to the largest count for
    the fixed-size ``all_gather``. Identity (the same tensor) when not distributed. The input is never modified.

    Raises:
        DistributedError: ranks disagree on the trailing shape or dtype, or a peer failed.
    """
    if not is_distributed():
        return local
    tail = tuple(local.shape[1:])
    meta = _all_gather_ints([local.shape[0], len(tail), _dtype_code(local.dtype), *_pad_shape(tail)], stage)
    if counts is not None and [int(c) for c in counts] != meta[:, 0].tolist():
        raise DistributedError(f"{stage}: counts {list(counts)} do not match the ranks' row counts "
                               f"{meta[:, 0].tolist()}")
    if not bool((meta[:, 1:] == meta[0, 1:]).all()):
        raise DistributedError(f"{stage}: ranks hold rows of different shapes or dtypes "
                               f"(this rank: {tuple(local.shape)} {local.dtype})")
    sizes = meta[:, 0].tolist()
    longest = max(sizes)
    buf = torch.zeros((longest, *tail), dtype=local.dtype, device=_state.comm_device)
    buf[:local.shape[0]] = local  # a padded copy: the caller's tensor is left alone
    parts = [torch.empty_like(buf) for _ in range(_state.world)]
    with _collective(stage):
        dist.all_gather(parts, buf)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _pad_shape(tail: tuple[int, ...], width: int = 4) -> list[int]:
    """Trailing dimensions as a fixed-width int list (compared across ranks; deeper shapes are folded)."""
    dims = list(tail[:width - 1])
    rest = 1
    for d in tail[width - 1:]:
        rest *= d
    dims.append(rest if len(tail) >= width else -1)
    return dims + [-1] * (width - len(dims))


# ---------------------------------------------------------------------------------------------------- reduction
def reduce_accumulator(acc: GramAccumulator | CovarianceAccumulator | SketchAccumulator, solver: str = "auto",
                       n_components: NComponents = None):
    """Merge every rank's accumulator; returns a NEW accumulator, identical on every rank.

    Args:
        acc: this rank's statistics over its shard (not modified).
        solver: the detector's solver setting. With ``'auto'`` a single process chooses Gram when the total N is
            below D; ranks chose from their own (smaller) N, so the kind is re-decided here from the global N and
            Gram statistics become covariance ones when the global N has reached D.
        n_components: the detector's; with ``'auto'`` Gram statistics whose global N passes ``SKETCH_RANK`` + 1
            become summaries (``fre_torch.core.sketch``), as in one process.

    Returns:
        ``acc`` itself when not distributed; else a fresh ``GramAccumulator`` holding all rows in the original order,
        a fresh ``CovarianceAccumulator`` with the global count, mean and scatter (both exact), or a fresh
        ``SketchAccumulator``, the ranks' summaries merged in rank order.

    Raises:
        DistributedError: ranks hold accumulators of different feature sizes, or a peer failed.
    """
    if not is_distributed():
        return acc
    kind = _GRAM if isinstance(acc, GramAccumulator) else _COVARIANCE if isinstance(
        acc, CovarianceAccumulator) else _SKETCH
    n_local = acc.n_samples if kind == _GRAM else acc.flush()._count if kind == _SKETCH else acc._count
    meta = _all_gather_ints([kind, n_local, acc.n_features], "reducing the fit statistics")
    if not bool((meta[:, 2] == acc.n_features).all()):
        raise DistributedError(f"ranks accumulated different feature sizes {meta[:, 2].tolist()}; "
                               "run every rank with the same model settings")
    n_total = int(meta[:, 1].sum())
    if bool((meta[:, 0] == _SKETCH).any()) or summarises(n_total, acc.n_features, solver, n_components):
        return _reduce_sketch(acc, meta[:, 1].tolist())
    if bool((meta[:, 0] == _COVARIANCE).any()):
        target = "covariance"  # covariance statistics cannot become rows again
    else:
        target = resolve_solver(solver, n_total, acc.n_features)
    if target == "gram":
        rows = gather_rows(acc.rows, meta[:, 1].tolist(), stage="gathering the training feature rows")
        out = GramAccumulator(acc.n_features, device=acc.rows.device, dtype=acc.rows.dtype)
        return out.update(rows, check_finite=False)
    cov = acc.to_covariance() if kind == _GRAM else acc
    return _reduce_covariance(cov, meta[:, 1].tolist())


def _reduce_sketch(acc: GramAccumulator | SketchAccumulator, counts: list[int]) -> SketchAccumulator:
    """Every rank's summary (a Gram accumulator's rows summarised first), gathered and merged in rank order."""
    if isinstance(acc, GramAccumulator):
        acc = SketchAccumulator(acc.n_features, device=acc.rows.device, dtype=acc.rows.dtype).update(
            acc.rows, check_finite=False)
    acc.flush()
    stage = "gathering the fit summaries"
    ranks = _all_gather_ints([acc.directions.shape[0]], stage)[:, 0].tolist()
    directions = gather_rows(acc.directions, ranks, stage=stage)
    singular = gather_rows(acc.singular_values[:, None], ranks, stage=stage)[:, 0]
    means = gather_rows(acc.mean[None], [1] * len(counts), stage=stage)
    traces = gather_rows(acc.scatter_trace.reshape(1, 1), [1] * len(counts), stage=stage)[:, 0]
    out = SketchAccumulator(acc.n_features, rank=acc.rank, device=acc.mean.device, dtype=acc.directions.dtype)
    start = 0
    for r, (n, m) in enumerate(zip(counts, ranks)):
        if n:
            piece = SketchAccumulator(acc.n_features, rank=acc.rank, device=acc.mean.device,
                                      dtype=acc.directions.dtype)
            piece.n_samples = torch.tensor(n, dtype=torch.int64, device=acc.mean.device)
            piece.mean, piece.scatter_trace = means[r], traces[r]
            piece.directions, piece.singular_values = directions[start:start + m], singular[start:start + m]
            piece._count = n
            out.merge(piece)
        start += m
    return out


@torch.inference_mode(False)  # see barrier
def _reduce_covariance(acc: CovarianceAccumulator, counts: list[int]) -> CovarianceAccumulator:
    """All-reduce of float64 sums about a common shift ``c``: with ``d_r = mean_r - c``,

        N = sum n_r,   dbar = sum n_r d_r / N,   mean = c + dbar,
        scatter = sum (scatter_r + n_r d_r d_r^T) - N dbar dbar^T.

    The identity is exact; taking ``c`` = the first non-empty rank's mean keeps every ``d_r`` of the size of the
    spread between shard means, so the final subtraction cancels no more than Chan's pairwise update does (raw
    ``sum x x^T - N mu mu^T`` would lose digits to a large feature mean).
    """
    device = acc.mean.device
    src = next(i for i, c in enumerate(counts) if c > 0)  # counts sum to >= world >= 1
    shift = acc.mean.detach().clone().to(_state.comm_device)
    with _collective("reducing the covariance statistics"):
        dist.broadcast(shift, src=src)
    n_r = acc._count
    d = acc.mean.to(_state.comm_device) - shift
    # Both sums are built out of place: the input accumulator's buffers are never touched.
    first = d * n_r
    second = acc.scatter.to(_state.comm_device) + torch.outer(d, d) * n_r
    with _collective("reducing the covariance statistics"):
        dist.all_reduce(first)
        dist.all_reduce(second)
    n = sum(counts)
    dbar = first / n
    scatter = second - torch.outer(dbar, dbar) * n
    out = CovarianceAccumulator(acc.n_features, device=device)
    out.load_state_dict({"n_samples": torch.tensor(n, dtype=torch.int64),
                         "mean": (shift + dbar).to(device, FIT_DTYPE),
                         "scatter": scatter.to(device, FIT_DTYPE)})
    return out


# ---------------------------------------------------------------------------------------------------- settings
def config_hash(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash_check(settings: Mapping[str, Any]) -> str:
    """Compare ``config_hash(settings)`` across ranks; raise ``ConfigMismatchError`` on every rank if they differ.

    Pass everything that must agree for the shards to fit together: the detector config, the weights, the batch
    size (it sets the shard boundaries) and the list of images. Returns the hash; a no-op check when not
    distributed.
    """
    digest = config_hash(settings)
    if not is_distributed():
        return digest
    # Two int64 words of the digest: a collision between honest mismatches is not a concern.
    words = [int.from_bytes(bytes.fromhex(digest[i:i + 16]), "big", signed=True) for i in (0, 16)]
    seen = _all_gather_ints(words, "comparing settings across ranks")
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(seen.tolist()):
        groups.setdefault(tuple(row), []).append(r)
    if len(groups) > 1:
        parts = "; ".join(f"ranks {v}" for v in groups.values())
        raise ConfigMismatchError(f"the ranks were started with different settings or data "
                                  f"(groups with equal settings: {parts}); start every rank with the same "
                                  "arguments, weights, data and fre_torch version")
    return digest
