"""Block offload: the DiT's blocks live in (pinned) host memory and visit the GPU one at a time, the next one
copied on a side stream while the current one computes, so the 14B model renders on a 24 GB card.

`resident` blocks stay on the device for good (as many as the card holds beyond the activations); the rest
are streamed in order, block i+1 prefetched when block i starts (and block 0's successor of the next forward
after the last block). A streamed block's tensors are dropped after it runs (the caching allocator reuses
their memory for the next one). On the CPU the copies are real clones, so the tests exercise the same swaps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BlockOffloader:
    def __init__(self, blocks: nn.ModuleList, device: str | torch.device, resident: int = 0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.streamed = list(range(max(0, resident), len(blocks)))
        found = {i: _tensor_slots(blocks[i]) for i in self.streamed}
        self.host = {i: [self._to_host(t) for *_, t in slots] for i, slots in found.items()}
        # where each tensor goes, without holding the original (device) tensors
        self.slots = {i: [(m, n, is_param) for m, n, is_param, _ in slots] for i, slots in found.items()}
        del found
        for i, block in enumerate(blocks):
            if i in self.slots:
                self._install(i, [_placeholder(t, self.device) for t in self.host[i]])
            else:
                block.to(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.live: set[int] = set()
        self.max_live = 0  # most streamed blocks on the device at once (tests: at most 2)
        self.copies = 0

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu")
        return host.pin_memory() if self.cuda else host

    def _fetch(self, i: int) -> None:
        """Starts copying block i to the device (side stream on CUDA)."""
        if i in self.pending or i in self.live or i not in self.slots:
            return
        if self.stream is None:
            self.pending[i] = ([t.clone() for t in self.host[i]], None)
        else:
            with torch.cuda.stream(self.stream):
                tensors = [t.to(self.device, non_blocking=True) for t in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.pending[i] = (tensors, event)
        self.copies += 1

    def before(self, i: int) -> None:
        """Block i is about to run: its weights in place (waiting for its copy), the next one on its way."""
        if i in self.slots:
            self._fetch(i)
            tensors, event = self.pending.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                for t in tensors:  # used on the compute stream: not to be reused before it is done
                    t.record_stream(torch.cuda.current_stream(self.device))
            self._install(i, tensors)
            self.live.add(i)
            self.max_live = max(self.max_live, len(self.live) + len(self.pending))
        if self.streamed:
            later = [j for j in self.streamed if j > i]
            self._fetch(later[0] if later else self.streamed[0])
            self.max_live = max(self.max_live, len(self.live) + len(self.pending))

    def after(self, i: int) -> None:
        if i in self.slots:
            self._install(i, [_placeholder(t, self.device) for t in self.host[i]])
            self.live.discard(i)

    def _install(self, i: int, tensors: list[torch.Tensor]) -> None:
        for (module, name, is_param), tensor in zip(self.slots[i], tensors, strict=True):
            if is_param:
                module._parameters[name].data = tensor
            else:
                module._buffers[name] = tensor

    def refresh(self) -> int:
        """After weights were loaded into streamed blocks (an adapter swap assigns real tensors where the
        placeholders were): take them as the new host copies and put the placeholders back. Returns how many."""
        taken = 0
        for i, slots in self.slots.items():
            for k, (module, name, is_param) in enumerate(slots):
                tensor = module._parameters[name] if is_param else module._buffers[name]
                if tensor is not None and tensor.numel() > 0 and i not in self.live:
                    self.host[i][k] = self._to_host(tensor)
                    taken += 1
            if i not in self.live:
                self._install(i, [_placeholder(t, self.device) for t in self.host[i]])
        return taken

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.host.values() for t in tensors)


def _tensor_slots(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(module, name, is parameter, tensor) for every parameter and buffer of the block."""
    slots = []
    for module in block.modules():
        slots += [(module, n, True, p) for n, p in module._parameters.items() if p is not None]
        slots += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
    return slots


def _placeholder(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=device)
