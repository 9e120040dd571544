"""Packed-sequence layout and per-layout device tables.

Index tables built from host integers (sequence offsets, image geometry) are sent to the device
once per distinct content and reused (:func:`device_table`), so a repeated forward at fixed
shapes makes no host-to-device copy and can be captured in a CUDA graph.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

_TABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_TABLES = 1024
_LOCK = threading.Lock()


def _flatten(data) -> tuple[tuple[int, ...], list[int]]:
    """Shape and row-major values of a (nested) sequence of ints."""
    if isinstance(data, (list, tuple)):
        if not data:
            return (0,), []
        parts = [_flatten(d) for d in data]
        if any(p[0] != parts[0][0] for p in parts):
            raise ValueError("device_table needs a rectangular nested sequence")
        return (len(data), *parts[0][0]), [v for p in parts for v in p[1]]
    return (), [data]


def device_table(data, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A tensor of host values on ``device``, built once per (content, dtype, device) and cached.

    The result is shared between calls: treat it as read-only. Under ``torch.compile`` it is
    created in the graph instead (the graph holds it); in inference mode the cache is separate,
    because inference tensors cannot be saved for a later backward. A CUDA graph captured after a
    warm-up call reads the cached tables, which the cache keeps alive (its last 1024 layouts).
    """
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return torch.tensor(data, dtype=dtype, device=device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape, values = _flatten(data)
    key = (shape, tuple(values), dtype, device, torch.is_inference_mode_enabled())
    with _LOCK:
        table = _TABLES.get(key)
        if table is None or not is_shared_table(table):  # new, or written to in place since
            table = torch.tensor(values, dtype=dtype).view(shape).to(device, non_blocking=True)
            table._ps3_shared_table = True  # read-only by contract: see is_shared_table
            _TABLES[key] = table
            if len(_TABLES) > _MAX_TABLES:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
    return table


def is_shared_table(t: torch.Tensor) -> bool:
    """Whether ``t`` came from :func:`device_table`'s cache and was not written to in place since:
    its content is then what it was built with, so what is derived from it (an attention block
    schedule) can be kept as long as the tensor lives."""
    return getattr(t, "_ps3_shared_table", False) and (t.is_inference() or t._version == 0)


@dataclass(frozen=True, eq=False)
class PackedSequences:
    """Sequences packed back to back along the token dimension (flash-attn's varlen layout).

    Attributes:
        cu_seqlens: int32 ``(num_seqs + 1,)`` cumulative lengths, on the tokens' device.
        max_seqlen: the longest length as a host int, so kernels size their grids without a sync
            (None: unknown; the reference then reads it from ``cu_seqlens``, a device sync).
        prefix_index: int32 ``(num_seqs,)``, the key/value prefix row each sequence attends to
            (PS3: the low-res cache of the sequence's image), or None.
        lengths, host_prefix_index: the same as host ints when known (:meth:`from_lengths`);
            the ops then validate the layout without reading device memory.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int | None
    prefix_index: torch.Tensor | None = None
    lengths: tuple[int, ...] | None = None
    host_prefix_index: tuple[int, ...] | None = None

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str = "cpu",
                     prefix_index: Sequence[int] | None = None) -> "PackedSequences":
        """Layout of sequences of the given host lengths (device tables cached per layout)."""
        lengths = tuple(lengths)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths):
            raise ValueError(f"lengths must be ints >= 0, got {list(lengths)}")
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        index = None
        if prefix_index is not None:
            prefix_index = tuple(prefix_index)
            if len(prefix_index) != len(lengths) or any(
                    isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in prefix_index):
                raise ValueError(f"prefix_index must hold one int >= 0 per sequence ({len(lengths)}), "
                                 f"got {list(prefix_index)}")
            index = device_table(prefix_index, device, torch.int32)
        return cls(device_table(cu, device, torch.int32), max([0, *lengths]), index, lengths, prefix_index)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        """Number of packed tokens (reads ``cu_seqlens[-1]``, a device sync, without host lengths)."""
        return sum(self.lengths) if self.lengths is not None else int(self.cu_seqlens[-1])

    def seq_ids(self, total: int | None = None) -> torch.Tensor:
        """Sequence of every packed token, int64 ``(total,)`` (``total`` defaults to :attr:`total_tokens`)."""
        cu = self.cu_seqlens.long()
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=cu.device), cu[1:] - cu[:-1],
                                       output_size=self.total_tokens if total is None else total)

    def padding_mask(self, prefix_len: int = 0) -> torch.Tensor:
        """Keys each sequence sees once padded to ``max_seqlen``: bool ``(num_seqs, prefix_len + max_seqlen)``,
        the prefix then its own tokens (the reference's attention mask)."""
        cu = self.cu_seqlens.long()
        own = torch.arange(self.max_seqlen, device=cu.device)[None, :] < (cu[1:] - cu[:-1])[:, None]
        return torch.cat([own.new_ones(self.num_seqs, prefix_len), own], dim=1)

    def dense_mask(self, num_prefixes: int = 0, prefix_len: int = 0) -> torch.Tensor:
        """Which keys each packed query sees: bool ``(total, num_prefixes * prefix_len + total)``.

        Keys are every prefix row's ``prefix_len`` positions (row-major), then all packed tokens;
        token ``t`` of sequence ``s`` sees row ``prefix_index[s]`` (row ``s`` without an index)
        and the tokens of ``s``. Quadratic in the tokens: for tests and small inputs.
        """
        seq = self.seq_ids()
        own = seq[:, None] == seq[None, :]
        if num_prefixes == 0 or prefix_len == 0:
            return torch.cat([own.new_zeros(own.shape[0], num_prefixes * prefix_len), own], dim=1)
        index = (self.prefix_index.long() if self.prefix_index is not None
                 else torch.arange(self.num_seqs, device=seq.device))
        rows = torch.arange(num_prefixes, device=seq.device).repeat_interleave(prefix_len)
        return torch.cat([index[seq][:, None] == rows[None, :], own], dim=1)
