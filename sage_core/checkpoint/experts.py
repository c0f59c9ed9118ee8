"""Experts: where one sparse layer's experts live, the LRU cache, the on-demand provider."""

import sys
from collections.abc import Callable

import torch
from torch import nn

from sage_core.checkpoint.reader import (
    _check_header,
)
from sage_core.errors import CheckpointError
from sage_core.model.config import ThinkerTextConfig
from sage_core.offload.cache_policy import make_policy


class ExpertSource:
    """The file keys of one sparse layer's experts, per-expert or fused, and how to read them.

    Per-expert layout: `...mlp.experts.{e}.{gate,up,down}_proj.weight`, gate/up [I, H] and
    down [H, I]. Fused layout: `...mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first)
    and `...mlp.experts.down_proj` [E, H, I]. Either way an expert reads as
    (gate_up [2I, H], down [H, I]) converted to `dtype` on `device`.
    """

    def __init__(self, reader, prefix: str, cfg: ThinkerTextConfig, dtype, device):
        self.reader = reader
        self.prefix = prefix  # e.g. "thinker.model.layers.3.mlp.experts."
        self.num_experts = cfg.num_experts
        self.dtype, self.device = dtype, device
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_shape = (2 * inter, hidden)
        self.down_shape = (hidden, inter)
        self.fused = (
            prefix + "gate_up_proj" in reader.keys() or prefix + "down_proj" in reader.keys()
        )

    def validate(self) -> None:
        """Check every key and shape of every expert from the headers (no data read)."""
        e, (two_i, h), (_, i) = self.num_experts, self.gate_up_shape, self.down_shape
        if self.fused:
            _check_header(self.reader, self.prefix + "gate_up_proj", (e, two_i, h))
            _check_header(self.reader, self.prefix + "down_proj", (e, h, i))
            return
        for expert in range(e):
            for name, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
                _check_header(self.reader, f"{self.prefix}{expert}.{name}_proj.weight", shape)

    def _read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> int:
        shape, _ = self.reader.header(key)
        if index is not None:
            shape = shape[1:]
        if tuple(shape) != tuple(out.shape):  # the file changed since the header check
            where = key if index is None else f"{key}[{index}]"
            raise CheckpointError(
                f"{self.reader.path_of(key)}: tensor {where!r} has shape {list(shape)}, "
                f"expected {list(out.shape)}"
            )
        return self.reader.read_into(key, out, index)

    def read_into(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> int:
        """Copy one expert, converted, into `gate_up` [2I, H] and `down` [H, I]; -> bytes read."""
        if self.fused:
            return self._read_into(self.prefix + "gate_up_proj", gate_up, expert) + (
                self._read_into(self.prefix + "down_proj", down, expert)
            )
        key, inter = f"{self.prefix}{expert}.", self.gate_up_shape[0] // 2
        return (
            self._read_into(key + "gate_proj.weight", gate_up[:inter])  # gate rows first
            + self._read_into(key + "up_proj.weight", gate_up[inter:])
            + self._read_into(key + "down_proj.weight", down)
        )

    def read(self, expert: int, into=None) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """((gate_up, down), bytes read from the file) for one expert, for the cache.

        `into`: an evicted expert's (gate_up, down) to overwrite instead of allocating.
        """
        if into is not None and self._fits(*into):
            gate_up, down = into
        else:
            # Normal tensors even under inference_mode, so a later call under no_grad
            # may still read the next expert into them.
            # Laid out as in the resident stack (`expert_stack`), so a cached expert runs
            # the same kernels as a resident one and gives bit-identical outputs.
            with torch.inference_mode(False):
                gate_up = expert_matrix(*self.gate_up_shape, self.dtype, self.device)
                down = expert_matrix(*self.down_shape, self.dtype, self.device)
        return (gate_up, down), self.read_into(expert, gate_up, down)

    def _fits(self, gate_up, down) -> bool:
        return all(
            tuple(t.shape) == shape
            and t.dtype == self.dtype
            and t.device == torch.device(self.device)
            for t, shape in ((gate_up, self.gate_up_shape), (down, self.down_shape))
        )

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (gate_up [E, 2I, H], down [E, H, I]) for the resident model, filled expert
        by expert (no second full-size copy, whatever the file layout); on CPU each expert
        is stored transposed (see `expert_stack`)."""
        e = self.num_experts
        gate_up = expert_stack(e, *self.gate_up_shape, dtype=self.dtype, device=self.device)
        down = expert_stack(e, *self.down_shape, dtype=self.dtype, device=self.device)
        for expert in range(e):
            self.read_into(expert, gate_up[expert], down[expert])
        return gate_up, down


def expert_stack(num: int, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """An empty [num, rows, cols] stack of expert matrices.

    On CPU every [rows, cols] matrix is stored transposed (column-major), so F.linear(x, w)
    multiplies by a row-major w.T: on this project's 2-core CPU decode and prefill ran
    faster than with row-major experts, for sage_core and transformers alike (the
    benchmarks run on these stacks; benchmarks/RESULTS.md). Elsewhere (unmeasured, e.g.
    the CUDA gather path) the usual row-major layout. Shapes, names and values are the same."""
    if torch.device(device).type == "cpu":
        stack = torch.empty(num, cols, rows, dtype=dtype, device=device)
        return stack.transpose(1, 2)  # (num, rows, cols), each matrix column-major
    return torch.empty(num, rows, cols, dtype=dtype, device=device)


def expert_matrix(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """One empty [rows, cols] expert matrix with the strides of a slice of `expert_stack`
    (column-major on CPU). Not a view: the cache may recycle it (`_held_only_by_caller`)."""
    if torch.device(device).type == "cpu":
        return torch.empty_strided((rows, cols), (1, rows), dtype=dtype, device=device)
    return torch.empty(rows, cols, dtype=dtype, device=device)


def _held_only_by_caller(tensors) -> bool:
    """True when nothing but the caller's tuple refers to these tensors or their memory:
    no other Python reference, no view, no tensor saved for autograd."""
    for t in tensors:
        # References here: the tuple, the loop variable and getrefcount's own argument.
        if not isinstance(t, torch.Tensor) or sys.getrefcount(t) > 3:
            return False
        if t.is_inference() and not torch.is_inference_mode_enabled():
            return False  # not writable here
        try:  # private counters (torch 2.x); without them, never recycle
            if t._use_count() != 1:
                return False
            # One storage reference from the tensor, one from untyped_storage()'s handle.
            if torch._C._storage_Use_Count(t.untyped_storage()._cdata) != 2:
                return False
        except AttributeError:
            return False
    return True


class ExpertCache:
    """Cache of expert weights keyed by (layer, expert), holding at most `capacity`.

    `get(key, load)` returns the cached weights, or evicts entries (chosen by `policy`, see
    `sage_core.offload.cache_policy`) until the policy has room and calls
    `load() -> (weights, bytes_read)`. Evicting first keeps the number of experts held by
    the cache within the bound at every moment. `prefetch(key, load)` reads an expert ahead
    of its use the same way; stats count `prefetched` experts and the `wasted` ones evicted
    unused. The weights a key maps to never depend on the policy, so any policy, with or
    without prefetch, gives the all-resident model's outputs.

    An evicted entry that nothing else still refers to is kept as the spare: the loader
    may take it (`take_spare`) and read the next expert into its memory, so a full cache
    recycles its buffers instead of freeing and allocating one expert per miss, which
    fragments the heap and raised the peak RSS of the mid benchmark.
    """

    def __init__(self, capacity: int, policy: str = "lru", layers=None, **policy_options):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_resident_experts must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        # policy_options: e.g. predictor= for "learned" (None: the committed default one).
        self.policy = make_policy(policy, capacity, layers=layers, **policy_options)
        self._entries: dict = {}
        self._unused_prefetch: set = set()
        self._spare = None
        self.hits = self.misses = self.evictions = self.bytes_read = self.peak_resident = 0
        self.recycled = self.prefetched = self.wasted = self.prefetch_bytes = 0

    def take_spare(self):
        """The last evicted entry's weights if no one else holds them, else None (once)."""
        spare, self._spare = self._spare, None
        if spare is not None and isinstance(spare, tuple) and _held_only_by_caller(spare):
            self.recycled += 1
            return spare
        return None

    def get(self, key, load: Callable[[], tuple[object, int]]):
        if key in self._entries:
            self.policy.touch(key)
            self._unused_prefetch.discard(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        return self._admit(key, load)

    def prefetch(self, key, load: Callable[[], tuple[object, int]]) -> bool:
        """Read `key` ahead of its use unless resident; -> whether it was read."""
        if key in self._entries:
            return False
        before = self.bytes_read
        self._admit(key, load)
        self._unused_prefetch.add(key)
        self.prefetched += 1
        self.prefetch_bytes += self.bytes_read - before
        return True

    def _admit(self, key, load):
        while (victim := self.policy.victim(key)) is not None:
            self._spare = self._entries.pop(victim)
            self.policy.forget(victim)
            self.evictions += 1
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.wasted += 1
        try:
            weights, nbytes = load()
        finally:
            self._spare = None  # never held past the miss that evicted it
        self._entries[key] = weights
        self.policy.admit(key)
        self.bytes_read += nbytes
        self.peak_resident = max(self.peak_resident, len(self._entries))
        return weights

    def keys(self) -> list:
        """Cached keys, in the policy's order (for LRU: least recently used first)."""
        return self.policy.keys()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_read": self.bytes_read,
            "peak_resident": self.peak_resident,
            "resident": len(self._entries),
            "capacity": self.capacity,
            "recycled": self.recycled,
            "policy": self.policy.name,
            "prefetched": self.prefetched,
            "prefetch_bytes": self.prefetch_bytes,
            "wasted": self.wasted,
        }


class OnDemandExperts(nn.Module):
    """Expert provider of one sparse layer that reads experts from disk through a shared cache.

    Same interface as ResidentExperts (`num_experts`, `expert(e) -> (gate_up, down)`), no
    parameters: the weights live in the ExpertCache, not in the module.
    """

    def __init__(self, layer_idx: int, source: ExpertSource, cache: ExpertCache):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = source.num_experts
        self.source = source
        self.cache = cache

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = int(e)
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range [0, {self.num_experts})")
        return self.cache.get(
            (self.layer_idx, e), lambda: self.source.read(e, into=self.cache.take_spare())
        )

    def prefetch(self, e: int) -> bool:
        """Read expert `e` into the cache ahead of its use; -> whether it was read."""
        e = int(e)
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range [0, {self.num_experts})")
        return self.cache.prefetch(
            (self.layer_idx, e), lambda: self.source.read(e, into=self.cache.take_spare())
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, on_demand=True"
