"""The transformers side of the cache: layers speaking ``DynamicLayer``'s protocol (full attention
and sliding windows) over a :class:`~kvquant.cache.store.KVStore`, and the ``Cache`` holding them."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvquant.cache.edits import KVEdits
from kvquant.cache.format import CacheOptions, LayerTables
from kvquant.cache.positions import LayerRope
from kvquant.cache.steps import CodeSteps
from kvquant.cache.store import KVStore


class _QuantKV(CodeSteps, KVEdits, KVStore):
    """Storage, edits and decoding steps with the layer protocol shared by the full-attention and
    sliding-window layers."""

    def _setup(self, tables: LayerTables, options: CacheOptions, sink: int, rope: LayerRope | None) -> None:
        self._setup_store(tables, options, sink, rope)
        self._setup_steps()
        # transformers' assisted decoding calls activate_past_recording, then crops the rejected drafts
        self.record_past = False
        self.is_croppable = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        super().lazy_initialization(key_states, value_states)  # empty keys/values, is_initialized
        self._allocate(key_states)
        self._choose_kernel(key_states.device)

    def activate_past_recording(self, **kwargs) -> None:
        """Keep what a crop of the last update needs to replay it exactly (transformers calls this
        before assisted decoding; sliding layers also keep past tokens until the crop). Keyword
        arguments (5.25+: ``recurrent_states_to_keep``) are for recurrent layers; an attention layer
        has no recurrent state, so they are accepted and unused, as transformers' own layers do."""
        self.record_past = True

    def reorder_cache(self, beam_idx: torch.LongTensor, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            idx = beam_idx.to(self.device)
            self._map(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self, *args, **kwargs) -> None:
        self._clear()
        self._seen = 0
        self._dev_tables = None
        super().reset()
        self.is_initialized = False  # so the next update re-creates the storage (5.23+ base reset does; 5.17's does not)

    def offload(self, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self, *args, **kwargs) -> None:
        if self.is_initialized and self.k_codes is not None and self.k_codes.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class KVQuantLayer(_QuantKV, DynamicLayer):
    """Full-attention layer: holds every token ([sink | quantized | residual])."""

    def __init__(self, tables: LayerTables, options: CacheOptions, rope: LayerRope | None = None, **kwargs):
        DynamicLayer.__init__(self)
        self._setup(tables, options, options.sink, rope)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store(key_states, value_states)
        if self._deferrable():
            return self._defer(self.held_tokens)
        return self._materialize()

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """What :meth:`update` stores, without returning the held tokens (``positions`` (B, 1, n):
        the tokens' position ids for pre-RoPE keys, else the attention module's)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states, positions)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.held_tokens

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        """Remove ``-tokens_to_remove`` (a negative int) tokens from the end, as DynamicLayer."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized or self.k_codes is None:
            self._undo = None  # the update was kept: nothing to take back
            return
        self._drop_back(-tokens_to_remove)


class KVQuantSlidingLayer(_QuantKV, DynamicSlidingWindowLayer):
    """Sliding-window layer: keeps the last ``sliding_window − 1`` tokens (group mode: plus the
    rest of a partly expired group) and returns, like ``DynamicSlidingWindowLayer``, at most the
    last ``sliding_window − 1`` past tokens plus the new ones (past recording included)."""

    def __init__(self, sliding_window: int, tables: LayerTables, options: CacheOptions,
                 rope: LayerRope | None = None, **kwargs):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self._setup(tables, options, options.sink, rope)  # sinks stay exact while inside the window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        self._store(key_states, value_states)
        if self._deferrable():
            return self._defer(min(self.held_tokens, self.sliding_window - 1 + n))
        k, v = self._materialize()
        if not self.record_past:
            self._keep_last(self.sliding_window - 1)
        visible = self.sliding_window - 1 + n
        if k.shape[2] > visible:
            k, v = k[:, :, -visible:], v[:, :, -visible:]
        return k, v

    def _end_step(self) -> None:
        if not self.record_past:
            self._keep_last(self.sliding_window - 1)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[2]
        self._append(key_states, value_states, positions)

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """What :meth:`update` stores (expired tokens dropped), without returning the window."""
        self._store(key_states, value_states, positions)
        self._end_step()

    def crop(self, tokens_to_remove: int, *args, **kwargs) -> None:
        if not self.is_initialized or self.k_codes is None:
            return
        if not tokens_to_remove:
            self._undo = None  # the update was kept: nothing to take back
        if self.get_seq_length() >= self.sliding_window:
            if not self.record_past:
                raise RuntimeError(
                    "`crop` was called, but the current layer does not track past states, and the sliding window "
                    "size was already reached. Call `activate_past_recording` before `crop` to be able to rollback."
                )
            if tokens_to_remove > 0:
                raise RuntimeError("once the sliding window is reached, crop only with a negative number of tokens")
            if tokens_to_remove < 0:
                self._drop_back(-tokens_to_remove)
                self.cumulative_length += tokens_to_remove
            self._keep_last(self.sliding_window - 1)
        else:
            if tokens_to_remove > 0:
                raise ValueError("crop with a negative number of tokens to remove")
            self._drop_back(-tokens_to_remove)
            self.cumulative_length = self.held_tokens


class KVQuantCache(Cache):
    """A transformers ``Cache`` of :class:`KVQuantLayer` / :class:`KVQuantSlidingLayer` (build it
    with :func:`make_cache`)."""

    def __init__(self, layers: list, options: CacheOptions):
        super().__init__(layers=layers)
        self.options = options

    def kvquant_begin_step(self, layer: int, q_len: int) -> "_QuantKV | None":
        """kvquant's attention pre-hook: the layer that will defer the coming step's attention
        to :meth:`~kvquant.cache.steps.CodeSteps.decode_attention` (one new token, a layout read from codes), or None."""
        target = self.layers[layer] if layer < len(self.layers) else None
        return target if isinstance(target, _QuantKV) and target.begin_step(q_len) else None

    def reads_codes(self) -> bool:
        """Whether decoding steps read attention from the codes (every quantized layer does)."""
        layers = self._quant_layers()
        return bool(layers) and all(layer.reads_codes for layer in layers)

    def _quant_layers(self) -> list[_QuantKV]:
        return [layer for layer in self.layers if isinstance(layer, _QuantKV)]

    def _layer_bytes(self) -> list[tuple[int, int]]:
        """``(bytes, batch × held tokens)`` per layer, a storage shared by layers counted with the first."""
        seen: set = set()
        return [(layer.memory_bytes(seen), layer.held_tokens * (layer.k_codes.shape[0] if layer.held_tokens else 0))
                for layer in self._quant_layers()]

    def memory_bytes(self) -> int:
        """Bytes held by all layers' tensors (codes, scales, exact sink/residual tokens, the
        rotation plans of decoding from codes), each storage counted once."""
        return sum(n for n, _ in self._layer_bytes())

    def bytes_per_token(self) -> float:
        """Bytes per token of context (all layers, per batch row): Σ over layers of the layer's
        held bytes / (batch × held tokens)."""
        return sum(n / t for n, t in self._layer_bytes() if t)

    def quantized_bytes_per_token(self) -> float:
        """Steady-state bytes per quantized token, all layers (codes + their scales)."""
        return sum(layer.quantized_bytes_per_token() for layer in self._quant_layers())

    def fp16_bytes_per_token(self) -> int:
        """Bytes per token of an fp16 KV cache of the same model (all layers)."""
        return sum(layer.fp16_bytes_per_token() for layer in self._quant_layers())

    def quantized_tokens(self) -> int:
        """Tokens held as codes by the layer that holds the most (a full-attention one)."""
        return max((layer.quantized_tokens for layer in self._quant_layers() if layer.is_initialized), default=0)

    def table_bytes(self) -> int:
        """Static tables (per model, not per token): key codebooks, offsets, scales, value codebook."""
        return sum(layer.tables.nbytes() for layer in self._quant_layers())
