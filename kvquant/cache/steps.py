"""Decoding steps read from the codes: a layer told a one-token step is coming (kvquant's attention
pre-hook) returns placeholders from ``update`` and computes the step's attention from its codes with
the device's kernel (:func:`kvquant.kernels.dispatch.step_kernel`: C on the CPU, Triton on CUDA).
The one place a layer dispatches to a kernel."""

from __future__ import annotations

import torch

from kvquant.kernels.dispatch import RotationPlan, step_kernel


class CodeSteps:
    """Decoding from codes for a :class:`~kvquant.cache.store.KVStore` (a mixin of it)."""

    def _setup_steps(self) -> None:
        o, t = self.options, self.tables
        self.reads_codes = (o.decode == "codes" and o.group > 0 and o.group % 8 == 0
                            and o.quantize_values and t.k_offset.shape[-1] % 8 == 0)
        self._channel_layout = self._channel_tables() if self.packing else None
        self._wants_codes = False  # set by begin_step for the next update
        self._step_kernel = None  # the kernel reading a step from the codes (_choose_kernel: the device's)
        self.step_pending: int | None = None  # an update deferred its attention: the first visible token

    def _choose_kernel(self, device: torch.device) -> None:
        """The kernel of ``device`` for this layout (None: steps dequantize)."""
        if self.reads_codes:
            self._step_kernel = step_kernel(self.options.kernel, device, self.options.group)[0]

    def _channel_tables(self) -> tuple[torch.Tensor, ...]:
        """``(offset, levels, bits, centers)``: where each (head, channel)'s codes lie in a group
        record (:meth:`ChannelPacking.channel_offsets`) and its centers (H, D, K) float32."""
        c = self.tables.k_centers
        h, d = self.tables.k_offset.shape
        centers = c if c.ndim == 3 else c[:, None, :].expand(h, d, c.shape[-1])
        return (*self.packing.channel_offsets(), centers.float().contiguous())

    def begin_step(self, q_len: int) -> bool:
        """Called before the attention module's forward (kvquant's pre-hook) with its query
        length: for one new token, if this layer reads codes, the next :meth:`update` returns
        placeholders and the attention calls :meth:`decode_attention`."""
        self._wants_codes = q_len == 1 and self.reads_codes
        return self._wants_codes

    def _defer(self, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders (zero-stride) of the ``visible`` last held tokens' shape; the step waits
        for :meth:`decode_attention`."""
        self._wants_codes = False
        self.step_pending = self.held_tokens - visible
        b, h = self.res_k.shape[:2]
        p = torch.zeros((), dtype=self.dtype, device=self.device).expand(b, h, visible, self.head_dim)
        return p, p

    def _deferrable(self) -> bool:
        return self._wants_codes and self._step_kernel is not None

    def decode_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None) -> torch.Tensor:
        """The deferred step's attention (B, 1, H_q, D), read from the codes by the layer's kernel
        (:func:`kvquant.kernels.dispatch.step_kernel`: C on the CPU, Triton on CUDA)."""
        start, self.step_pending = self.step_pending, None
        if start is None:
            raise RuntimeError("decode_attention without a deferred update (begin_step, then update, first)")
        out = self._step_kernel(self, query, attention_mask, scaling, start)
        self._end_step()
        return out

    def _end_step(self) -> None:
        """What update leaves to after the attention (sliding layers: drop expired tokens)."""

    def _rotation_plan(self):
        key = (self._seen - self.held_tokens, self.quantized_tokens, self.k_codes.shape[0], self.k_pos is not None)
        if self._plan is None or self._plan.key != key:
            self._plan = RotationPlan.build(self, key)
        return self._plan
