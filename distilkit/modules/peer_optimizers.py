"""A cohort's optimizers and LR schedulers, one per peer, that Lightning sees as one of each.

Lightning counts ``trainer.global_step`` in optimizer steps: under manual optimization every
``LightningOptimizer.step()`` adds one, so P optimizers stepped per batch would end a ``max_steps: 300`` run
after 300 / P batches. :class:`PeerOptimizers` keeps one optimizer per peer (their own learning rates,
schedules and states) behind one ``torch.optim.Optimizer``: the module steps it once per batch through
Lightning (one global step), after stepping any peer that had to be updated earlier in the batch directly
(:meth:`PeerOptimizers.step_peer`). Checkpoints carry every peer's optimizer and scheduler state; callbacks
that set learning rates (the curriculum) see every peer's parameter groups in ``param_groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class _PeerStates(MutableMapping[Tensor, Any]):
    """The per-parameter states of several optimizers as one mapping (each parameter's lives with its own
    optimizer, which writes and checkpoints it)."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self._optimizers = optimizers
        self._owner = {
            id(p): opt for opt in optimizers for group in opt.param_groups for p in group["params"]
        }

    def __getitem__(self, param: Tensor) -> Any:
        return self._owner[id(param)].state[param]

    def __setitem__(self, param: Tensor, value: Any) -> None:
        self._owner[id(param)].state[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._owner[id(param)].state[param]

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class PeerOptimizers(Optimizer):
    """One optimizer per peer, as one ``Optimizer``.

    ``param_groups`` lists every peer's groups (the peers' own dicts, read afresh: loading a state replaces
    them; setting a group's ``lr`` sets that peer's rate); ``state`` reads and writes each peer's optimizer
    state; ``state_dict()`` is ``{"peers": [each optimizer's state_dict]}``.

    Args:
        optimizers: the peers' optimizers, in peer order; no parameter may be in two of them.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is in more than one peer's optimizer")
        self.optimizers = list(optimizers)
        self._states = _PeerStates(self.optimizers)
        self._initialised = False
        super().__init__(params, {})  # hooks and defaults; the groups and states stay the peers'
        self._initialised = True

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        """Ignored (``Optimizer.__init__`` assigns an empty list): the groups are the peers' own."""

    @property  # type: ignore[override]
    def state(self) -> _PeerStates:
        return self._states

    @state.setter
    def state(self, value: Any) -> None:
        """Ignored (``Optimizer.__init__`` assigns one): each peer's optimizer keeps its own state."""

    def has_gradients(self, index: int) -> bool:
        """Whether any parameter of peer ``index`` holds a gradient."""
        groups = self.optimizers[index].param_groups
        return any(p.grad is not None for group in groups for p in group["params"])

    def step_peer(self, index: int) -> None:
        """Update peer ``index`` alone, with its own optimizer (nothing when it holds no gradients)."""
        if self.has_gradients(index):
            self.optimizers[index].step()

    def zero_peer(self, index: int) -> None:
        """Drop the gradients of peer ``index`` (set to None: its optimizer then skips them)."""
        self.optimizers[index].zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (Lightning's hooks), then update every peer that holds gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, optimizer in enumerate(self.optimizers):
            if self.has_gradients(index):
                optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"peers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        peers = state_dict.get("peers")
        if not isinstance(peers, list) or len(peers) != len(self.optimizers):
            raise ValueError(
                f"the saved optimizer state is not that of a cohort of {len(self.optimizers)} peers"
            )
        for optimizer, state in zip(self.optimizers, peers, strict=True):
            optimizer.load_state_dict(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._initialised:  # Optimizer.__init__ offers every parameter once: they are the peers' already
            raise NotImplementedError("add parameter groups to a peer's own optimizer")

    def __repr__(self) -> str:
        return f"PeerOptimizers({', '.join(type(opt).__name__ for opt in self.optimizers)})"


class PeerSchedulers:
    """One LR scheduler per peer (None: a constant rate), stepped together.

    Lightning sees one scheduler attached to the :class:`PeerOptimizers` (``optimizer``); its state is
    ``{"peers": [each scheduler's state_dict or None]}``.
    """

    def __init__(self, optimizer: PeerOptimizers, schedulers: Sequence[Any | None]) -> None:
        if len(schedulers) != len(optimizer.optimizers):
            raise ValueError("give one scheduler (or None) per peer")
        self.optimizer = optimizer
        self.schedulers = list(schedulers)

    def step(self) -> None:
        for scheduler in self.schedulers:
            if scheduler is not None:
                scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"peers": [None if s is None else s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        peers = state_dict.get("peers")
        if not isinstance(peers, list) or len(peers) != len(self.schedulers):
            raise ValueError(f"the saved scheduler state is not that of {len(self.schedulers)} peers")
        for scheduler, state in zip(self.schedulers, peers, strict=True):
            if scheduler is not None and state is not None:
                scheduler.load_state_dict(state)
