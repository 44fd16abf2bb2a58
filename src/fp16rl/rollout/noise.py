"""Randomness that pairs arms: counter-based Exp(1) noise for the sampler's exponential race.

Completion ``g`` of the prompt in slot ``s`` gets the 32-bit key ``derived_seed(seed, s, g)``
(``row_keys``); its noise at position ``t`` for token ``v`` is a hash of ``(key, t, v)``
(``TokenNoise``). No generator state is shared between rows, so a row's draws do not depend on
the batch, on which rows finish, on the engine or on the device: paired bf16/fp16 arms see the
same noise and draw the same tokens unless two candidates are nearly tied.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fp16rl.core.seeds import derived_seed

_HASH_MULTIPLIER = 0x45D9F3B  # Thomas Mueller's 32-bit integer hash; < 2^27 so int64 products never overflow
_LOW32 = 0xFFFFFFFF


def mix32(x: Any) -> Any:
    """A 32-bit integer hash of ints, or of int64 tensors holding values in [0, 2^32): every bit avalanches."""
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _LOW32
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _LOW32
    return (x >> 16) ^ x


def row_keys(seed: int, slots: Sequence[int], num_generations: int) -> torch.Tensor:
    """One 32-bit key per completion row (prompt-major, as rows are laid out): a hash of (seed, slot, g)."""
    keys = [derived_seed(seed, slot, g) for slot in slots for g in range(num_generations)]
    return torch.tensor(keys, dtype=torch.int64)


class TokenNoise:
    """Counter-based Exp(1) noise: ``E[row, position, token] = -log U(hash(key_row, position, token))``.

    Every number is a pure function of the row's key, the token position and the token id, computed
    with integer hashing on the device: no generator state is shared between rows, so a row's draws
    are the same whichever other rows exist or finish and whichever engine or device runs it.
    ``U = (h >> 8 + 1/2) / 2^24`` lies in (0, 1), so ``E`` is finite and positive.

    Why blocks: a decode step of a small model is bound by its number of operations, and the noise was
    ~20 of them a step (~70 us of ~430 on a CPU core for 8 rows of a 512-token vocabulary). The rows'
    position hashes are computed for ``POSITIONS`` positions at once, and the whole-vocabulary noise
    (top_p 1, no top_k) for as many positions as fit ``block_bytes``; a step then indexes. The numbers
    are the same elementwise operations on the same integers, so the same noise.
    """

    POSITIONS = 64

    # 256 KB blocks stay in a core's cache through the ~20 passes: 1 MB ones were slower than none at 32
    # rows of 512 tokens (63 against 60 us a step; 36 with 256 KB), bench/RESULTS.md.
    def __init__(self, keys: torch.Tensor, vocab_size: int, block_bytes: int = 256 * 2**10):
        self.keys = keys
        self.token_hash = _as_int32(mix32((torch.arange(vocab_size, device=keys.device) * 0x9E3779B1 + 0x7F4A7C15)
                                          & _LOW32))
        self.bases: tuple[int, torch.Tensor] | None = None  # (first position, [rows, POSITIONS] int32)
        self.vocab_positions = min(self.POSITIONS, block_bytes // (4 * vocab_size * max(1, len(keys))))
        self.vocab_noise: tuple[int, torch.Tensor] | None = None  # (first position, [rows, positions, vocab])

    def exponential(self, rows: torch.Tensor | None, position: int, tokens: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """``[len(rows), vocab]`` fp32 noise for rows ``rows`` (indices into the keys; None: every key's
        row, in order) at ``position``; with ``tokens`` (``[len(rows), K]`` ids) only theirs, the same
        numbers."""
        if tokens is None and self.vocab_positions > 1:
            if self.vocab_noise is None or not 0 <= position - self.vocab_noise[0] < self.vocab_positions:
                bases = self._bases(position, self.vocab_positions)  # [all rows, positions]
                self.vocab_noise = (position, self._noise(bases[:, :, None] ^ self.token_hash))
            start, noise = self.vocab_noise
            noise = noise[:, position - start]
            return noise if rows is None else noise.index_select(0, rows)
        token_hash = self.token_hash[None, :] if tokens is None else self.token_hash[tokens]
        bases = self._bases(position, 1)
        bases = bases if rows is None else bases.index_select(0, rows)
        return self._noise(bases[:, None] ^ token_hash)

    def _bases(self, position: int, count: int) -> torch.Tensor:
        """``[all rows, count]`` int32 row-position hashes for positions ``position ..``; with ``count``
        1, ``[all rows]`` at ``position``, taken from a cached block of ``POSITIONS``."""
        if self.bases is None or not self.bases[0] <= position <= self.bases[0] + self.POSITIONS - count:
            positions = torch.arange(position, position + max(count, self.POSITIONS), device=self.keys.device)
            position_hash = mix32((positions * 0x85EBCA6B + 0x165667B1) & _LOW32)
            self.bases = (position, _as_int32(mix32(self.keys[:, None] ^ position_hash)))
        start, bases = self.bases
        offset = position - start
        return bases[:, offset] if count == 1 else bases[:, offset:offset + count]

    @staticmethod
    def _noise(hashes: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise from the row-position-token hashes before their final mix."""
        bits = _mix32_int32(hashes)
        bits >>= 8
        bits &= 0xFFFFFF
        return exponential_from_bits(bits)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 tensor of the same 32 bits (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on the 32 bits held in an int32 tensor, the same bits out.

    Why: the ``[rows, vocab]`` hash is the noise's cost at top_p 1 (7 ms a step for 8 rows of a 49k
    vocabulary in int64, whose multiply AVX2 lacks). In int32 the product wraps modulo 2^32 as the int64
    one masked to 32 bits does, and a logical shift right by 16 is the arithmetic one masked to 16 bits."""
    # In place on fresh tensors: one allocation a round instead of four (the same operations).
    for multiply in (True, True, False):
        y = x >> 16
        y &= 0xFFFF
        y ^= x
        if multiply:
            y *= _HASH_MULTIPLIER
        x = y
    return x


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws ``-log u`` from 24 uniform bits, ``u = (bits + 0.5) / 2^24``, always > 0.

    In fp32 the top value ``(2^24 - 0.5) / 2^24`` rounds to exactly 1, and ``-log 1 = -0`` would make
    the race divide by zero: ``0 / -0`` is NaN, which ``argmax`` picks, so a token that top-p/top-k had
    removed would be drawn (seen on SmolLM2: once in a few hundred row-steps of a 49k vocabulary). ``u``
    is capped at the largest fp32 below 1; every other value is unchanged.
    """
    uniform = bits.to(torch.float32, copy=True)  # the rest in place on this copy
    uniform.add_(0.5).mul_(1.0 / 2**24).clamp_(max=1.0 - 2**-24)
    return uniform.log_().neg_()
