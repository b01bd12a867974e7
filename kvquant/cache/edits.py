"""Taking tokens out of a layer's storage: the oldest (sliding windows), the newest (``crop``:
assisted decoding's rejected drafts, chat edits), with an exact replay of the last update while
past recording is on (:class:`kvquant.cache.store.Undo`)."""

from __future__ import annotations

import torch

from kvquant.cache.store import RESIDUAL_FIELDS, slice_tokens


class KVEdits:
    """Crop and slide a :class:`~kvquant.cache.store.KVStore` (a mixin of it: uses its storage)."""

    def _drop_front(self, n: int) -> None:
        """Drop the ``n`` oldest tokens (in group mode only whole quantized groups, so groups stay
        aligned with the token stream: fewer may go); sinks go with their slots."""
        m = min(n, self.quantized_tokens)
        if self.group:
            m = m // self.group * self.group
        if m:
            self._slice_quantized(m, None)
            self.sink_k, self.sink_v = slice_tokens(self.sink_k, m, None), slice_tokens(self.sink_v, m, None)
            n -= m
        if n <= 0 or self.quantized_tokens or self.group:  # group mode: the residual is the next group
            return
        m = min(n, self.res_k.shape[2])
        if m:
            self._slice_residual(m, None)
            self.sink_k, self.sink_v = slice_tokens(self.sink_k, m, None), slice_tokens(self.sink_v, m, None)

    def _drop_back(self, n: int) -> None:
        """Drop the ``n`` newest tokens. Within the last update while past recording is on (the
        drafts assisted decoding rejects), the layer is put back as it was before that update
        and the kept tokens are appended again from their exact copies: the layer then equals
        one fed only the kept tokens. Otherwise, in group mode, the kept part of a split group goes back
        to the residual as the keys and values the cache served for it (dequantized, rotated at
        its positions; sinks as their exact copies; INT8 again with an ``int8`` tail): a group's
        codes cannot be re-encoded without its dropped tokens, and the exact originals are gone.

        ``_seen`` is lowered with each part removed, so that ``_seen − held_tokens`` stays the
        stream index of the first held token: the split group is read (and pre-RoPE keys
        rotated) at its own positions."""
        undo, self._undo = self._undo, None
        if undo is not None and 0 < n <= undo.tokens:
            undo.restore(self)
            kept = undo.tokens - n
            if kept:
                self._append(undo.k[:, :, :kept], undo.v[:, :, :kept],
                             None if undo.pos is None else undo.pos[:, :, :kept])
            self._undo = None  # what was cropped is gone
            return
        m = min(n, self.res_k.shape[2])
        if m:
            self._slice_residual(None, self.res_k.shape[2] - m)
            self._seen -= m
            n -= m
        have = self.quantized_tokens
        m = min(n, have)
        if m:
            keep = have - m
            partial = keep % self.group if self.group else 0
            if partial:
                k, v = self._dequantized()
                (ck, sk), (cv, sv) = self._encode_tails(k[:, :, keep - partial : keep], v[:, :, keep - partial : keep])
                for name, t in zip(RESIDUAL_FIELDS[:4], (ck, sk, cv, sv)):
                    if t is not None:
                        setattr(self, name, torch.cat([t, getattr(self, name)], dim=2))
                if self.res_pos is not None:
                    self.res_pos = torch.cat([self.k_pos[:, :, keep - partial : keep], self.res_pos], dim=2)
            self._slice_quantized(None, keep - partial)
            self._seen -= m
        self.sink_k, self.sink_v = slice_tokens(self.sink_k, None, self.held_tokens), slice_tokens(self.sink_v, None, self.held_tokens)

    def _keep_last(self, n: int) -> None:
        extra = self.held_tokens - max(n, 0)
        if extra > 0:
            self._drop_front(extra)
