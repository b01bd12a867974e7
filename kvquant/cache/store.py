"""A layer's stored layout: key codes (per token, or per group with per-channel mid/half), value
codes and scales, the exact sinks and the residual (the newest incomplete group, ``tail`` format),
stored positions of pre-RoPE keys — appended, dequantized, sliced and counted. No transformers
protocol here (:mod:`kvquant.cache.layers`); the layout is described in :mod:`kvquant.cache`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from kvquant.cache.format import _VALUE_SCALE_BYTES, SCALE_DTYPE, CacheOptions, LayerTables
from kvquant.cache.positions import LayerRope
from kvquant.cache.static_layout import dequantize_keys, dequantize_values, pack, unpack
from kvquant.core import scalar as cb
from kvquant.core.groupnorm import causal_groups
from kvquant.core.hadamard import hadamard
from kvquant.core.int8_rows import ROW_SCALE_MAX, ROW_SCALE_MIN, decode_int8_rows, encode_int8_rows
from kvquant.core.packing import ChannelPacking, packed_size
from kvquant.core.quantizer import GroupCodes, decode_groups, encode_groups
from kvquant.core.rope import derotate, rotate
from kvquant.kernels import cpu as cpu_kernels

# Per-layer storage, in token order: [quantized | residual (exact)], plus sink_k/sink_v: exact copies
# of the first held quantized tokens while they are the stream's first ``sink`` tokens. Values are
# per token; keys per token (static normalisation: k_codes (B, H, n, bytes)) or per group (group
# mode: k_codes (B, 1, n/G, bytes) and k_mid/k_half (B, H, n/G, D)).
# Pre-RoPE keys (``rope="pre"`` codebooks): the quantized keys are stored before the rotation and
# rotated at their positions when read: the stream indices while the position ids equal them
# (nothing stored), else k_pos (B, 1, n) and res_pos (B, 1, r), the position ids of the quantized
# and residual tokens (int32, counted).
_STORE = ("sink_k", "sink_v", "k_codes", "k_mid", "k_half", "v_codes", "v_scale", "k_pos", "res_k", "res_k_scale",
          "res_v", "res_v_scale", "res_pos")
_PER_TOKEN_Q = ("v_codes", "v_scale", "k_pos")
_PER_GROUP_K = ("k_codes", "k_mid", "k_half")
RESIDUAL_FIELDS = ("res_k", "res_k_scale", "res_v", "res_v_scale", "res_pos")


@lru_cache(maxsize=8)
def _value_rotation(head_dim: int, device: torch.device) -> torch.Tensor:
    """The Hadamard matrix of values="hadamard", one per size and device (a static table shared by
    every layer, like the codebooks: not counted in a cache's memory)."""
    return hadamard(head_dim).to(device)


def slice_tokens(t: torch.Tensor | None, start: int | None, stop: int | None) -> torch.Tensor | None:
    """``t[:, :, start:stop]`` as a fresh tensor, so the dropped part's storage is freed."""
    return None if t is None else t[:, :, start:stop].clone()


@dataclass
class Undo:
    """What a layer needs to take back its last update: the state before it (held tokens as
    codes, exact sink copies, the residual tensors, the stream index, whether positions were
    stored) and the update's own keys, values (B, H, n, D) and position ids (B, 1, n) as given.
    Kept only while past recording is on; its tensors are counted in the layer's memory."""

    quantized: int
    sinks: int
    residual: tuple
    seen: int
    positions_stored: bool
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    @classmethod
    def of(cls, layer: "KVStore", k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> "Undo":
        return cls(layer.quantized_tokens, layer.sink_k.shape[2], tuple(getattr(layer, n) for n in RESIDUAL_FIELDS),
                   layer._seen, layer.k_pos is not None, k.clone(), v.clone(), None if pos is None else pos.clone())

    def restore(self, layer: "KVStore") -> None:
        """Put ``layer`` back as it was before the update (codes appended since are sliced off)."""
        layer._slice_quantized(None, self.quantized)
        layer.sink_k, layer.sink_v = slice_tokens(layer.sink_k, None, self.sinks), slice_tokens(layer.sink_v, None, self.sinks)
        for name, t in zip(RESIDUAL_FIELDS, self.residual):
            setattr(layer, name, t)
        layer._seen = self.seen
        if not self.positions_stored:
            layer.k_pos = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.residual, self.k, self.v, self.pos) if t is not None]


class KVStore:
    """One layer's storage (see the module docstring); :class:`kvquant.cache.layers.KVQuantLayer` and
    its sliding-window twin add transformers' layer protocol and decoding from codes."""

    def _setup_store(self, tables: LayerTables, options: CacheOptions, sink: int, rope: LayerRope | None) -> None:
        self.tables = tables
        self.rope = rope
        self.options = options
        self.sink_cap = sink
        self.group = options.group
        self.packing = ChannelPacking(tables.k_levels, options.group) if options.group else None
        self._plan = None  # decoding from codes: the rotation plan of pre-RoPE keys (kvquant.cache.steps)
        self._dev_tables: LayerTables | None = None
        self._seen = 0  # tokens appended so far, less those cropped (stream index of the next one)
        self._clear()

    def _allocate(self, key_states: torch.Tensor) -> None:
        """Empty storage for keys like ``key_states`` (B, H, n, D), in their dtype and device."""
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if h != self.tables.k_centers.shape[0] or d != self.tables.k_offset.shape[-1]:
            raise ValueError(
                f"layer gets {h} KV heads × {d} dims, the codebooks are for "
                f"{self.tables.k_centers.shape[0]} × {self.tables.k_offset.shape[-1]}"
            )
        self.head_dim = d
        dev, dt, o = key_states.device, key_states.dtype, self.options
        e = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.sink_k, self.sink_v = e(b, h, 0, d), e(b, h, 0, d)
        if self.group:
            self.k_codes = e(b, 1, 0, self.packing.group_bytes, dtype=torch.uint8)
            sd = torch.float16 if o.scale_bits == 16 else torch.int8
            self.k_mid, self.k_half = e(b, h, 0, d, dtype=sd), e(b, h, 0, d, dtype=sd)
        else:
            self.k_codes = e(b, h, 0, packed_size(d, o.bits_k), dtype=torch.uint8)
        if o.quantize_values:
            self.v_codes = e(b, h, 0, packed_size(d, o.bits_v), dtype=torch.uint8)
            self.v_scale = e(b, h, 0, dtype=SCALE_DTYPE) if o.values == "rms" else e(b, h, 0, 2, dtype=torch.int8)
        else:
            self.v_codes, self.v_scale = e(b, h, 0, d), None
        if o.tail == "int8":
            self.res_k, self.res_k_scale = e(b, h, 0, d, dtype=torch.int8), e(b, h, 0, dtype=SCALE_DTYPE)
            if o.quantize_values:
                self.res_v, self.res_v_scale = e(b, h, 0, d, dtype=torch.int8), e(b, h, 0, dtype=SCALE_DTYPE)
            else:
                self.res_v = e(b, h, 0, d)
        else:
            self.res_k, self.res_v = e(b, h, 0, d), e(b, h, 0, d)
        # pre-RoPE positions: k_pos/res_pos stay None (the stream index) until a row departs from it
        self._dev_tables = self.tables.to(dev)
        # appends to an INT8 residual through the C library where it builds (decided once: a failed
        # build is not retried at every token)
        self._c_append = o.tail == "int8" and dev.type == "cpu" and cpu_kernels.available()[0]

    @property
    def held_tokens(self) -> int:
        if not self.is_initialized or self.k_codes is None:
            return 0
        return self.quantized_tokens + self.res_k.shape[2]

    @property
    def quantized_tokens(self) -> int:
        """Tokens held as codes (values are stored per token in both modes)."""
        return self.v_codes.shape[2]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in _STORE) if t is not None]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._plan = None
        self._undo = None  # rows moved: a later crop keeps what is served (_drop_back)
        for name in _STORE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def _clear(self) -> None:
        self._plan = None
        self._undo = None
        for name in _STORE:
            setattr(self, name, None)

    def _quantize_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Packed codes (and per-group stored mid/half in group mode) of keys ``k`` (B, H, n, D);
        in group mode n is a multiple of the group size."""
        t = self._dev_tables
        if not self.group:
            off, sc = t.k_offset[None, :, None, :], t.k_scale[None, :, None, :]
            return pack(cb.quantize((k.float() - off) / sc, t.k_boundaries, dim=1), self.options.bits_k), None, None
        q = encode_groups(k, self.group, self.options.scale_bits, t.k_boundaries)
        return self.packing.pack(q.codes), q.mid, q.half

    def _dequantize_keys(self, codes: torch.Tensor, mid: torch.Tensor | None,
                         half: torch.Tensor | None) -> torch.Tensor:
        t, d = self._dev_tables, self.head_dim
        if not self.group:
            return dequantize_keys(codes, t.k_centers, t.k_offset, t.k_scale, self.options.bits_k, d)
        q = GroupCodes(self.packing.unpack(codes), mid, half, self.options.scale_bits)
        return decode_groups(q, t.k_centers, self.group)

    def _value_rotation(self, device: torch.device) -> torch.Tensor:
        """``H`` (D, D) float32 on ``device``: values="hadamard" stores the codes of ``v H``."""
        return _value_rotation(self.head_dim, torch.device(device))

    def _quantize_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._dev_tables
        if self.options.values == "hadamard":
            v = v.float() @ self._value_rotation(v.device)
        if self.options.values in ("minmax", "hadamard"):  # the group quantizer along head_dim: one group per token
            b, h, n, d = v.shape
            q = encode_groups(v.transpose(2, 3), d, 8, t.v_boundaries.expand(h, -1))
            codes = q.codes.transpose(2, 3).contiguous()
            return pack(codes, self.options.bits_v), torch.stack([q.mid[:, :, 0], q.half[:, :, 0]], dim=-1)
        vf = v.float()
        scale = vf.square().mean(-1).sqrt().clamp(ROW_SCALE_MIN, ROW_SCALE_MAX).to(SCALE_DTYPE)
        vn = vf / scale.float().unsqueeze(-1)
        codes = cb.quantize(vn, t.v_boundaries.expand(v.shape[1], -1), dim=1)
        return pack(codes, self.options.bits_v), scale

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized segment, dequantized to the model's dtype, the sinks exact."""
        t, o = self._dev_tables, self.options
        k = self._dequantize_keys(self.k_codes, self.k_mid, self.k_half)
        if self.rope is not None:  # stored before the rotation: rotated at the tokens' positions
            k = rotate(k, *self.rope.tables(self._quantized_positions()))
        k = k.to(self.dtype)
        if o.quantize_values and o.values in ("minmax", "hadamard"):
            codes = unpack(self.v_codes, o.bits_v, self.head_dim).transpose(2, 3)
            q = GroupCodes(codes, self.v_scale[..., 0].unsqueeze(2), self.v_scale[..., 1].unsqueeze(2), 8)
            h = codes.shape[1]
            v = decode_groups(q, t.v_centers.expand(h, -1), self.head_dim).transpose(2, 3)
            if o.values == "hadamard":  # H is symmetric and orthonormal: v̂ = v̂' H
                v = v @ self._value_rotation(v.device)
            # contiguous: SDPA takes its fast (flash) CPU kernel only for a unit stride along head_dim
            v = v.to(self.dtype).contiguous()
        elif o.quantize_values:
            v = dequantize_values(self.v_codes, t.v_centers, self.v_scale, o.bits_v, self.head_dim).to(self.dtype)
        else:
            v = self.v_codes
        m = min(self.sink_k.shape[2], k.shape[2])
        if m:  # the exact sinks over their code slots (k and quantized v are fresh tensors here)
            k[:, :, :m] = self.sink_k[:, :, :m]
            if o.quantize_values:
                v[:, :, :m] = self.sink_v[:, :, :m]
        return k, v

    def _encode_tail(self, x: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys or values (B, H, n, D) as the residual holds them (``options.tail``, or ``exact``):
        as given, or INT8 codes ``round(x / s)`` with ``s = max|x| / 127`` per token and head in
        fp16 (B, H, n)."""
        if exact or self.options.tail == "exact":
            return x, None
        return encode_int8_rows(x)

    def _encode_tails(self, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple, tuple]:
        """``(codes, scale)`` of keys and values as :meth:`_encode_tail` holds them (values exact
        where they are not quantized); both INT8 encodings in one pass (the per-token ops dominate)."""
        if self.options.tail == "int8" and self.options.quantize_values and k.shape == v.shape and k.dtype == v.dtype:
            codes, scale = self._encode_tail(torch.stack((k, v)))
            return (codes[0], scale[0]), (codes[1], scale[1])
        return self._encode_tail(k), self._encode_tail(v, exact=not self.options.quantize_values)

    def _grown_tails(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``(res_k, res_k_scale, res_v, res_v_scale)`` with keys and values ``k``, ``v`` (B, H, n, D)
        appended as :meth:`_encode_tails` holds them. An INT8 tail on the CPU takes one pass of
        :func:`kvquant.kernels.cpu.append_int8` per side (equal bit for bit) in place of a dozen torch
        ops per token (BENCHMARKS.md "A token's INT8 append in one C pass")."""
        if self._c_append and k.dtype in cpu_kernels.ROW_DTYPES:
            res_k, res_k_scale = cpu_kernels.append_int8(self.res_k, self.res_k_scale, k)
            if self.options.quantize_values:
                return res_k, res_k_scale, *cpu_kernels.append_int8(self.res_v, self.res_v_scale, v)
            return res_k, res_k_scale, torch.cat([self.res_v, v], dim=2), None
        (ck, sk), (cv, sv) = self._encode_tails(k, v)
        cat = lambda a, b: None if b is None else torch.cat([a, b], dim=2)  # noqa: E731
        return cat(self.res_k, ck), cat(self.res_k_scale, sk), cat(self.res_v, cv), cat(self.res_v_scale, sv)

    def _decode_tail(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`_encode_tail` holds, in the model's dtype."""
        return codes if scale is None else decode_int8_rows(codes, scale, self.dtype)

    def _residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual's keys and values (B, H, r, D) in the model's dtype, sinks still there as
        their exact copies."""
        k, v = self._decode_tail(self.res_k, self.res_k_scale), self._decode_tail(self.res_v, self.res_v_scale)
        q, m = self.quantized_tokens, self.sink_k.shape[2]
        if self.options.tail == "int8" and m > q:  # k (and quantized v) are fresh tensors here
            k[:, :, : m - q] = self.sink_k[:, :, q:m]
            if self.res_v_scale is not None:
                v[:, :, : m - q] = self.sink_v[:, :, q:m]
        return k, v

    def _stream(self, start: int, n: int, batch: int) -> torch.Tensor:
        """Positions (B, 1, n) int32 equal to the stream indices ``start … start + n − 1``."""
        return torch.arange(start, start + n, dtype=torch.int32, device=self.device).expand(batch, 1, n)

    def _quantized_positions(self) -> torch.Tensor:
        """Positions (B, n) of the quantized tokens: stored, or their stream indices."""
        if self.k_pos is not None:
            return self.k_pos[:, 0]
        return self._stream(self._seen - self.held_tokens, self.quantized_tokens, self.k_codes.shape[0])[:, 0]

    def _track_positions(self, k: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor | None:
        """Positions (B, 1, n) of the ``n`` tokens being appended if they must be stored, else None.

        Keys of pre-RoPE codebooks need their positions when read. While every row's position
        ids are the tokens' stream indices (no padding) nothing is stored (0 bytes); from the first
        step that departs (left padding, custom position_ids) the positions of all held tokens
        are stored as int32 (counted)."""
        b, n = k.shape[0], k.shape[2]
        pos = self.rope.positions(b, n) if pos is None else pos
        if self.k_pos is None and not torch.equal(pos, self._stream(self._seen, n, b)):
            self.k_pos = self._stream(self._seen - self.held_tokens, self.quantized_tokens, b).clone()
            self.res_pos = self._stream(self._seen - self.res_k.shape[2], self.res_k.shape[2], b).clone()
        return pos if self.k_pos is not None else None

    def _append(self, k: torch.Tensor, v: torch.Tensor, given_pos: torch.Tensor | None = None) -> None:
        """Append ``n`` tokens' keys and values (B, H, n, D) as given to the layer (post-RoPE);
        ``given_pos`` (B, 1, n): their position ids, else those the attention module was called
        with (pre-RoPE codebooks only). While past recording is on, what a :meth:`crop` of these
        tokens needs to replay them exactly is kept (:class:`Undo`)."""
        if self.rope is not None:
            given_pos = self.rope.positions(k.shape[0], k.shape[2]) if given_pos is None else given_pos
        self._undo = Undo.of(self, k, v, given_pos) if self.record_past else None
        pos = self._track_positions(k, given_pos) if self.rope is not None else None
        first_new = self._seen  # stream index of k[:, :, 0]
        self._seen += k.shape[2]
        take = min(max(self.sink_cap - first_new, 0), k.shape[2])
        if take:  # exact copies of the sinks, laid over their slots when read
            self.sink_k = torch.cat([self.sink_k, k[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :take]], dim=2)
        res = dict(zip(RESIDUAL_FIELDS, (*self._grown_tails(k, v),
                                         None if pos is None else torch.cat([self.res_pos, pos], dim=2))))
        over = res["res_k"].shape[2] - self.options.residual
        if self.group:
            over = over // self.group * self.group  # whole groups only
        if over > 0:
            first = self._seen - res["res_k"].shape[2]  # stream index of the residual; in group mode a multiple of G
            head = {n: None if t is None else t[:, :, :over] for n, t in res.items()}
            keys = self._decode_tail(head["res_k"], head["res_k_scale"])
            values = self._decode_tail(head["res_v"], head["res_v_scale"])
            if self.rope is not None:
                at = head["res_pos"][:, 0] if pos is not None else self._stream(first, over, keys.shape[0])[:, 0]
                keys = derotate(keys, *self.rope.tables(at))
                if pos is not None:
                    self.k_pos = torch.cat([self.k_pos, head["res_pos"]], dim=2)
            if self.group and first == 0:  # the sinks are left out of group 0's range, as simulated
                keys = causal_groups(keys, self.group, self.sink_cap)
            codes, mid, half = self._quantize_keys(keys)
            self.k_codes = torch.cat([self.k_codes, codes], dim=2)
            if self.group:
                self.k_mid = torch.cat([self.k_mid, mid], dim=2)
                self.k_half = torch.cat([self.k_half, half], dim=2)
            if self.options.quantize_values:
                vcodes, scale = self._quantize_values(values)
                self.v_codes = torch.cat([self.v_codes, vcodes], dim=2)
                self.v_scale = torch.cat([self.v_scale, scale], dim=2)
            else:
                self.v_codes = torch.cat([self.v_codes, values], dim=2)
            res = {n: slice_tokens(t, over, None) for n, t in res.items()}
        for name, t in res.items():
            setattr(self, name, t)

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens as (B, H_kv, S, D) keys and values in the model's dtype."""
        if not self.quantized_tokens:
            return self._residual()
        k, v = self._dequantized()
        if not self.res_k.shape[2]:
            return k, v
        rk, rv = self._residual()
        return torch.cat([k, rk], dim=2), torch.cat([v, rv], dim=2)

    def _slice_quantized(self, start: int | None, stop: int | None) -> None:
        """Keep quantized tokens ``[start:stop]`` (group mode: whole groups)."""
        self._plan = None
        for name in _PER_TOKEN_Q:
            setattr(self, name, slice_tokens(getattr(self, name), start, stop))
        if self.group:
            g = lambda i: None if i is None else i // self.group  # noqa: E731
            for name in _PER_GROUP_K:
                setattr(self, name, slice_tokens(getattr(self, name), g(start), g(stop)))
        else:
            self.k_codes = slice_tokens(self.k_codes, start, stop)

    def _slice_residual(self, start: int | None, stop: int | None) -> None:
        for name in RESIDUAL_FIELDS:
            setattr(self, name, slice_tokens(getattr(self, name), start, stop))

    def _held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps between steps: its storage and the rotation plan of
        decoding from codes (whose δ tables the cache's layers share)."""
        undo = self._undo.tensors() if self._undo is not None else []
        return self._tensors() + (self._plan.tensors() if self._plan is not None else []) + undo

    def memory_bytes(self, seen: set | None = None) -> int:
        """Bytes of storage held by this layer's tensors, each storage counted once — and not at
        all if already in ``seen`` (the storages counted so far; updated)."""
        seen, total = set() if seen is None else seen, 0
        for t in self._held_tensors():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    def bytes_per_token(self) -> float:
        """:meth:`memory_bytes` per held token and batch row (0 when empty)."""
        n = self.held_tokens
        return self.memory_bytes() / (n * self.k_codes.shape[0]) if n else 0.0

    def quantized_bytes_per_token(self) -> float:
        """Bytes per token of the quantized segment: key codes (+ group mid/half / G) + value
        codes + value scale (or exact values), + the int32 position of pre-RoPE keys where positions
        are stored (not while they equal the stream index)."""
        h, d, o = self.tables.k_centers.shape[0], self.tables.k_offset.shape[-1], self.options
        if self.group:
            per_head = (self.packing.group_bytes / h + 2 * d * o.scale_bits / 8) / self.group
        else:
            per_head = packed_size(d, o.bits_k)
        if o.quantize_values:
            per_head += packed_size(d, o.bits_v) + _VALUE_SCALE_BYTES
        else:
            per_head += d * torch.finfo(getattr(self, "dtype", torch.float16)).bits // 8
        return h * per_head + (4 if self.k_pos is not None else 0)

    def fp16_bytes_per_token(self) -> int:
        """Bytes per token of the same layer's keys and values in fp16."""
        return 2 * self.tables.k_centers.shape[0] * self.tables.k_offset.shape[-1] * 2
