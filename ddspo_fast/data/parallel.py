"""Fill one pair dataset from one or several processes (``accelerate launch``).

Both dataset builders (``prepare``: sampled pairs, ``encode``: existing image pairs) work
the same way, written here once: the main process opens the :class:`PairWriter` (which
locks the directory and knows which ids a killed run already wrote), tells every process
what is left, and the work is cut into batches dealt round-robin to the processes. Each
round, every process computes the rows of its batch, the main process gathers and writes
them, so a dataset has one writer whatever the number of processes.

A process that fails (an exception, or a bad input the caller made fatal) does not leave
the others waiting forever in a collective: the failure travels with the round's results
and every process stops with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def store_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``store_dtype`` argument (what latents and embeddings are saved in)."""
    if name not in STORE_DTYPES:
        raise ValueError(f"store_dtype: expected one of {sorted(STORE_DTYPES)}, got {name!r}")
    return STORE_DTYPES[name]


def process_device(device=None):
    """``(accelerate's PartialState, this process's torch.device)``: ``device`` when given
    (checked to exist first, an error naming it), else accelerate's choice for the process."""
    from accelerate import PartialState

    if device is not None:
        from ..devices import check_device

        try:
            check_device(str(device))
        except ValueError as e:
            raise ValueError(f"device: {e}") from None
    state = PartialState(cpu=(str(device) == "cpu") if device is not None else False)
    return state, (torch.device(device) if device is not None else state.device)


def to_store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as stored in a dataset: floating point cast to ``dtype``, on the CPU."""
    return (t.to(dtype) if t.is_floating_point() else t).cpu()


@dataclass
class Problem:
    """One input left out of the dataset: where it is (file:line, file row N), its id, why."""

    where: str
    id: Optional[str]
    reason: str

    def __str__(self) -> str:
        who = f" (id {self.id})" if self.id is not None else ""
        return f"{self.where}{who}: {self.reason}"


@dataclass
class Produced:
    """What one batch of work yields: rows for ``PairWriter.add`` and inputs left out."""

    rows: List[dict] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)


class Stop(ValueError):
    """Raised in every process when one of them failed; the message names what failed."""


def fill_dataset(state, open_writer: Callable[[], object], work: Sequence[dict],
                 produce: Callable[[List[dict]], Produced], *, batch_size: int, desc: str,
                 progress: bool = True, on_batch: Optional[Callable[[int], None]] = None,
                 on_problem: Optional[Callable[[Problem], None]] = None) -> Tuple[int, int]:
    """Write ``produce(batch)`` for every not-yet-written item of ``work`` (dicts with an
    ``"id"``); returns ``(already, total)``: how many items of ``work`` the dataset held
    before this call and holds after it.

    ``open_writer`` is called on the main process only. ``on_problem`` is called (main
    process) for each input left out, in input order; it may raise to stop the run (the
    rows of that round written so far are kept). ``on_batch(n)`` gets the number of
    pairs written so far after each round.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    writer = None

    def share(obj):
        """Send the main process's ``obj`` to every process (a no-op with one process)."""
        box = [obj]
        if world > 1:
            broadcast_object_list(box)
        return box[0]

    try:
        done: object = None
        if main:
            try:
                writer = open_writer()
                done = sorted(writer.done_ids())
            except Exception as e:
                share(_failure(e))
                raise  # the main process reports its own error unchanged
        done = share(done)
        if isinstance(done, dict):
            raise Stop(done["message"])
        done_set = set(done)
        todo = [w for w in work if w["id"] not in done_set]
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        written = already = len(work) - len(todo)
        bar = tqdm(total=len(work), initial=written, desc=desc, dynamic_ncols=True,
                   disable=not (progress and main))
        try:
            for start in range(0, len(batches), world):
                mine = batches[start + rank] if start + rank < len(batches) else []
                if world == 1:
                    results = [produce(mine)]
                else:
                    try:
                        result: object = produce(mine) if mine else Produced()
                    except Exception as e:  # noqa: BLE001 - travels to the main process
                        result = _failure(e)
                    results = gather_object([result])
                failure = None
                if main:
                    try:
                        failed = [r for r in results if isinstance(r, dict)]
                        if failed:
                            raise Stop(failed[0]["message"])
                        for r in results:
                            for p in r.problems:
                                if on_problem is not None:
                                    on_problem(p)
                                bar.update(1)
                            for row in r.rows:
                                writer.add(**row)  # durable shard_size rows at a time
                            written += len(r.rows)
                            bar.update(len(r.rows))
                        if on_batch is not None:
                            on_batch(written)
                    except Exception as e:
                        share(_failure(e))
                        raise
                failure = share(failure)
                if failure is not None:
                    raise Stop(failure["message"])
        finally:
            bar.close()
    finally:
        if writer is not None:
            writer.close()
    state.wait_for_everyone()
    return already, written


def _failure(e: BaseException) -> dict:
    return {"message": str(e) or type(e).__name__, "type": type(e).__name__}
