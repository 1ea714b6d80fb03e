"""A train DataLoader that Lightning can stop and restart mid-epoch with nothing lost.

Lightning saves ``state_dict()`` of every train loader that has one into the checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and hands it back through ``load_state_dict``
just before it iterates the loader again on resume. A resumed loader must then yield only the
batches the epoch had left; Lightning counts the rest itself.

    fresh epoch:  iter(loader) -> ResumableRandomSampler draws its seed from the global torch RNG
                  (exactly as RandomSampler does) -> randperm(n) -> batches 0 .. len-1
    checkpoint:   {batches yielded this epoch, the epoch's seed, RNG states of every rank}
    resume:       same seed -> same randperm -> start at batches * batch_size (no data read);
                  then the process's RNG states are put back, so dropout draws the masks the
                  uninterrupted run drew

A sampler that is not ours (Lightning's DistributedSampler under DDP: its order follows
``set_epoch``, which Lightning calls with the restored epoch) is fast-forwarded by reading and
dropping the batches already trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

import msplora

__all__ = ["ResumableDataLoader", "ResumableRandomSampler", "get_rng_states", "set_rng_states"]


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler(data)`` (no replacement, no generator) that remembers its epoch's seed.

    Draws the same numbers as ``DataLoader(shuffle=True)``: one int64 from the global torch RNG
    per epoch, used to seed a fresh generator for ``randperm``. So a fresh run sees the order it
    saw before this class existed. Being a ``RandomSampler``, Lightning swaps it for a
    ``DistributedSampler`` under DDP exactly as it did the plain one.
    """

    def __init__(self, data_source) -> None:
        super().__init__(data_source)
        self.seed: int | None = None  # this epoch's seed, set when the epoch's first index is drawn
        self._resume: tuple[int, int] | None = None  # (seed, first index position) for the next epoch

    def resume_at(self, seed: int, start: int) -> None:
        """Make the next iteration replay the epoch seeded ``seed`` from position ``start``."""
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if self._resume is not None:
            (seed, start), self._resume = self._resume, None
        else:
            # The draw RandomSampler.__iter__ makes when it has no generator (torch 2.x).
            seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(n, generator=generator).tolist()[start:]


def get_rng_states() -> dict[str, Any]:
    """The process's global RNG states: torch (CPU, and CUDA when in use), numpy, python. Held in
    tensors and plain tuples, which Lightning's ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),  # keys: (624,) uint32
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _dist() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with the ``state_dict`` / ``load_state_dict`` pair Lightning looks for.

    Takes the arguments of ``DataLoader`` (Lightning re-creates it from them under DDP, with a
    ``DistributedSampler``). The saved state is the position in the current epoch, the epoch's
    seed (``ResumableRandomSampler``) and the global RNG states of every rank at save time.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0  # batches handed out in the current epoch
        self._pending: dict | None = None  # a loaded state, applied at the next iter()
        self._generator_at_start: torch.Tensor | None = None  # see _own_generator

    @property
    def _shuffler(self) -> ResumableRandomSampler | None:
        return self.sampler if isinstance(self.sampler, ResumableRandomSampler) else None

    @property
    def _own_generator(self) -> torch.Generator | None:
        """The generator of a sampler that owns one (transformers' LengthGroupedSampler): its
        state at the epoch's start fixes the epoch's order."""
        generator = getattr(self.sampler, "generator", None)
        return generator if isinstance(generator, torch.Generator) and self._shuffler is None else None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds a checkpoint on every rank (it writes rank 0's), so this collective
        # runs on all ranks together; each rank's dropout RNG differs, so each is kept.
        rank, world = _dist()
        rng = get_rng_states()
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        shuffler = self._shuffler
        return {
            "batches": self._yielded,
            "batch_size": self.batch_size,
            "num_samples": len(self.sampler),
            "seed": None if shuffler is None else shuffler.seed,
            "generator": self._generator_states(),
            "world_size": world,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = _dist()
        problems = []
        if state["world_size"] != world:
            problems.append(f"it was saved by {state['world_size']} processes, this run has {world}")
        if state["batch_size"] != self.batch_size:
            problems.append(f"its batch size was {state['batch_size']}, this run's is {self.batch_size}")
        if state["num_samples"] != len(self.sampler):
            problems.append(f"its epoch held {state['num_samples']} samples, this run's holds {len(self.sampler)}")
        if problems:
            raise msplora.ConfigError(
                f"ckpt_path: the checkpoint's place in the training data does not fit this run: {'; '.join(problems)}. "
                "Fix: resume with the data and device settings of the checkpointed run, or start a new fit"
            )
        self._pending = {**state, "rng": state["rng"][rank]}

    def __iter__(self) -> Iterator:
        # The underlying iterator is made now, as DataLoader makes it (its seed draw included), and
        # a resume is entered at the first next(): a state may be loaded after iter() (Lightning
        # iterates the train loader before it restores loop state when configure_optimizers asks
        # for estimated_stepping_batches, Lightning-AI/pytorch-lightning#20550), and Lightning
        # calls sampler.set_epoch (DistributedSampler) between iter() and the first next().
        self._yielded = 0
        if (generator := self._own_generator) is not None:
            self._generator_at_start = generator.get_state()  # before the sampler's draw (first next())
        return self._epoch(super().__iter__())

    def _generator_states(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(state at this epoch's start, state now) of the sampler's own generator, if any."""
        generator = self._own_generator
        if generator is None or getattr(self, "_generator_at_start", None) is None:
            return None
        return self._generator_at_start, generator.get_state()

    def _epoch(self, iterator: Iterator) -> Iterator:
        pending, self._pending = self._pending, None
        if pending is not None:
            iterator = self._resume(pending)
        for batch in iterator:
            self._yielded += 1
            yield batch

    def _resume(self, pending: dict) -> Iterator:
        """The rest of the saved epoch (or the next epoch, if it was complete); ``_yielded`` is
        set to the batches the saved epoch had already handed out."""
        generator, saved = self._own_generator, pending.get("generator")
        if pending["batches"] >= len(self):
            # Saved after the epoch's last batch: the next epoch starts from the saved RNG, as the
            # uninterrupted run's next epoch did (the iterator and the sampler draw their seeds).
            set_rng_states(pending["rng"])
            if generator is not None and saved is not None:
                generator.set_state(saved[1])
                self._generator_at_start = saved[1]
            return super().__iter__()
        if generator is not None and saved is not None:  # replay the saved epoch's draw, then skip
            generator.set_state(saved[0])
            self._generator_at_start = saved[0]
        skip = pending["batches"]
        shuffler = self._shuffler
        if shuffler is not None and pending["seed"] is not None:
            shuffler.resume_at(pending["seed"], skip * self.batch_size)  # same order, no data read
            iterator = super().__iter__()
        else:  # a sampler whose order we cannot enter mid-way: read and drop what was trained on
            iterator = super().__iter__()
            for _ in range(skip):
                next(iterator)
        # Last, after the iterator's own seed draw: the uninterrupted run drew that at the epoch's start.
        set_rng_states(pending["rng"])
        self._yielded = skip
        return iterator
