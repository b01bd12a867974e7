"""Decoding steps read from the codes (kvquant.kernels.dispatch, kvquant.kernels.cpu) equal the
dequantize-then-SDPA reference: the same codes, outputs within float rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, random_ids
from test_cache import calibrated, stepwise_logits

from kvquant.kernels import cpu as cpu_kernels
from kvquant.cache import CacheOptions, KVQuantLayer, LayerTables, make_cache
from kvquant.cache.layers import _QuantKV
from kvquant.kernels.dispatch import attend
from kvquant.hf.compat import cache_kwargs
from kvquant.core.packing import LEVEL_PACKING

pytestmark = pytest.mark.skipif(not cpu_kernels.available()[0], reason=cpu_kernels.available()[1])


def _check_steps(monkeypatch) -> dict:
    """Check every decoding step read from the codes against the dequantize reference on the same
    cache state (SDPA over the layer's dequantized tokens, the step's mask and scaling), and count
    the steps and the dequantizations made outside that check. (Comparing two whole decodes would
    not do: float rounding differs between the paths, and a later layer's quantizer can turn that
    into a different code.)"""
    stats = {"codes": 0, "dequantize": 0, "max_err": 0.0}
    decode, materialize = _QuantKV.decode_attention, _QuantKV._materialize
    checking = []

    def checked_decode(self, query, mask, scaling):
        checking.append(True)
        k, v = self._materialize()
        checking.pop()
        start = self.step_pending
        ref = F.scaled_dot_product_attention(query, k[:, :, start:], v[:, :, start:], attn_mask=mask, scale=scaling,
                                             enable_gqa=True).transpose(1, 2)
        if mask is not None:  # a row with no allowed key attends to nothing
            ref = ref.masked_fill(~mask.reshape(mask.shape[0], -1).any(-1)[:, None, None, None], 0.0)
        out = decode(self, query, mask, scaling)
        stats["codes"] += 1
        stats["max_err"] = max(stats["max_err"], float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
        return out

    def counted_materialize(self, *a, **k):
        stats["dequantize"] += not checking
        return materialize(self, *a, **k)

    monkeypatch.setattr(_QuantKV, "decode_attention", checked_decode)
    monkeypatch.setattr(_QuantKV, "_materialize", counted_materialize)
    return stats


@pytest.mark.parametrize("family,rope", [("llama", "pre"), ("llama", "post"), ("gemma3", "pre"), ("mistral", "pre"),
                                         ("qwen2", "pre"), ("gptneox", "pre"), ("gpt2", "post")])
def test_decoding_steps_read_codes_and_equal_the_dequantize_path(family, rope, monkeypatch):
    """Every family (GQA, sliding windows shorter than the sequence, partial rotary, no rotary):
    each decoding step's attention, read from the codes, equals SDPA over the dequantized tokens
    of the same cache; no step dequantized the held tokens; the logits stay those of the
    dequantize path (to float rounding amplified by later layers' quantizers)."""
    model = make_model(family)
    books = calibrated(model, norm="channel-group", group=8, sink=1, scale_bits=8, rope=rope)
    ids = random_ids(2, 30)
    ref = stepwise_logits(model, ids, make_cache(model, books, decode="dequantize"), 3)
    cache = make_cache(model, books)
    assert cache.reads_codes()
    stats = _check_steps(monkeypatch)
    got = stepwise_logits(model, ids, cache, 3)
    layers = sum(isinstance(layer, _QuantKV) for layer in cache.layers)
    assert stats["codes"] == layers * 27 and stats["dequantize"] == layers  # only the prefill dequantized
    assert stats["max_err"] < 1e-5
    # whole decodes: a later group's quantizer can turn a 1e-7 rounding difference into one other
    # code (0.01 in a logit, against logits of std ~1.6); a wrong step moves them by O(1)
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["int8", "exact"])
def test_half_precision_model_steps_read_codes(tail, dtype, monkeypatch):
    """A bfloat16 model (what the offline models ship in) or a float16 one: its queries, exact sinks
    and newest group (in the model's dtype, or INT8 codes with fp16 scales) reach the kernel in the
    dtypes it reads; each step equals SDPA over the dequantized tokens to the dtype's rounding (a
    dtype read wrongly gives garbage, not 1e-2)."""
    model = make_model("llama").to(dtype)
    books = calibrated(make_model("llama"), norm="channel-group", group=8, sink=1, scale_bits=8, rope="pre")
    stats = _check_steps(monkeypatch)
    stepwise_logits(model, random_ids(2, 20), make_cache(model, books, tail=tail), 3)
    assert stats["codes"] == 2 * 17 and 0 < stats["max_err"] < 3e-2


def test_padding_beams_allocation_and_value_widths_from_codes(monkeypatch):
    """Left padding (positions stored: the rotation table read per token; pad queries with no key
    to attend), bit allocation (channels of different level counts), 8- and 16-bit scales, rms
    values and every value width, greedy and beam search: every step equals the reference."""
    model = make_model("llama")
    ids = random_ids(2, 26)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    stats = _check_steps(monkeypatch)
    for scale_bits in (8, 16):
        books = calibrated(model, norm="channel-group", group=8, sink=1, scale_bits=scale_bits, rope="pre",
                           budget=3.0, budget_sides="k")
        assert books.k.channel_levels.unique().numel() > 1
        for kw in (dict(), dict(values="rms"), dict(values="hadamard"), *(dict(bits_v=b) for b in (1, 2, 3, 5, 8))):
            stepwise_logits(model, ids, make_cache(model, books, **kw), 3, attention_mask=mask)
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=mask[:, :14])
    for extra in (dict(), dict(num_beams=2)):
        out = model.generate(ids[:, :14], **cache_kwargs(make_cache(model, books)), **gen, **extra)
        assert out.shape == (2, 26)
    assert stats["codes"] == 2 * 8 * 23 * 2 + 2 * 11 * 2 and stats["max_err"] < 1e-5


def _synthetic_layer(levels: torch.Tensor, group: int, **options) -> KVQuantLayer:
    """A layer whose (head, channel)s have the given level counts (Lloyd-like sorted random centers)."""
    h, d = levels.shape
    k_max = int(levels.max())
    g = torch.Generator().manual_seed(3)
    centers = torch.full((h, d, k_max), float("nan"))
    bounds = torch.full((h, d, k_max - 1), float("inf"))
    for i in range(h):
        for j in range(d):
            n = int(levels[i, j])
            c = torch.sort(torch.rand(n, generator=g) * 2 - 1).values
            c[0], c[-1] = -1.0, 1.0
            centers[i, j, :n] = c
            bounds[i, j, : n - 1] = (c[1:] + c[:-1]) / 2
    centers = torch.nan_to_num(centers, nan=0.0)
    opts = CacheOptions(group=group, **options)
    v = torch.linspace(-1, 1, 2**opts.bits_v)
    tables = LayerTables(centers, bounds, torch.zeros(h, d), torch.ones(h, d), v, (v[1:] + v[:-1]) / 2, levels.long())
    return KVQuantLayer(tables, opts)


@pytest.fixture(params=["portable", "avx2"])
def narrower_kernel(request, monkeypatch):
    """The kernel built for a narrower CPU than this one may be: without AVX2 (no intrinsics: its
    portable C, what non-x86 hosts run), or with AVX2 and no AVX-512 (8-float vectors)."""
    features = cpu_kernels.cpu_features()
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: features - {"avx512f"})
    if request.param == "portable":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    elif "avx2" not in features:
        pytest.skip("no AVX2 on this CPU")
    cpu_kernels._library.cache_clear()
    assert ("-mavx2" in cpu_kernels._flags()) == (request.param == "avx2") and cpu_kernels.lanes() == 8
    yield
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


@pytest.fixture
def threads():
    """Run with the given torch thread count (the kernel's), restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("scale_bits,tail,rows,n_threads",
                         [(8, "exact", 3, 1), (16, "exact", 1, 1), (8, "int8", 5, 1), (8, "int8", 4, 1), (8, "int8", 3, 8)])
def test_every_level_count_window_mask_and_sinks(scale_bits, tail, rows, n_threads, threads):
    """Channels of every level count the packing knows (3 and 5 as base-n digits, 2…256 as bit
    fields), a first visible token inside a group (a sliding window), exact sinks and a residual
    (exact or INT8), a mask with a fully masked row, 1 to 5 query rows per KV head (the kernel sums
    up to 4 at once), each row's tokens cut into spans merged after (8 threads for 6 rows x heads:
    3 spans each, some with no allowed key): attend == SDPA over the dequantized tokens."""
    threads(n_threads)
    _check_every_level_count(scale_bits, tail, rows)


@pytest.mark.parametrize("tail,rows", [("int8", 5), ("exact", 3)])
def test_hadamard_values_are_rotated_back_in_the_kernel(tail, rows, threads):
    """values="hadamard" (codes of v·H): the kernel sums the coded tokens' values apart and rotates
    that sum back, the exact sinks and newest group not rotated — equal to SDPA over the
    dequantized tokens (v̂'·H) with every level count, windows, masks and spans (8 threads)."""
    threads(8)
    _check_every_level_count(8, tail, rows, values="hadamard", d=32)
    layer = _synthetic_layer(torch.full((2, 32), 16), 16, values="hadamard", bits_v=4)
    v = torch.randn(1, 2, 32, 32)
    v[..., :2] *= 10  # two outlier channels, as value rows have
    layer.update(torch.randn(1, 2, 32, 32), v)
    plain = _synthetic_layer(torch.full((2, 32), 16), 16, bits_v=4)
    plain.update(torch.randn(1, 2, 32, 32), v)
    err = {n: float((x._materialize()[1][:, :, 1:] - v[:, :, 1:]).square().mean()) for n, x in
           (("hadamard", layer), ("minmax", plain))}
    assert err["hadamard"] < 0.5 * err["minmax"]  # the rotation spreads the outliers: a smaller step


def test_hadamard_values_need_a_power_of_two_head_dim():
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=8, sink=1)
    make_cache(model, books, values="hadamard")  # head_dim 16
    books.k.centers = books.k.centers[:, :, :12]
    with pytest.raises(ValueError, match="power of two; this model's head_dim is 12"):
        make_cache(model, books, values="hadamard")


def test_native_kernel_uses_the_widest_vectors_this_cpu_has():
    """Where the CPU lists AVX-512 F the kernel is built with it (16-float vectors), else 8."""
    assert cpu_kernels.lanes() == (16 if "avx512f" in cpu_kernels.cpu_features() else 8)


def test_narrower_kernels_equal_the_reference(narrower_kernel, threads):
    """The same checks on the kernel compiled without AVX-512 (8-float vectors) and without AVX2
    (its portable lookups and GNU C vectors)."""
    threads(1)
    _check_every_level_count(8, "int8", 5)
    threads(8)
    _check_every_level_count(16, "exact", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_append_equals_the_torch_encoding(dtype, monkeypatch):
    """kvq_append_int8 (how a CPU layer appends to its INT8 residual) holds bit for bit what torch's
    encoding (KVStore._encode_tail) and torch.cat hold — all-zero rows (the smallest scale),
    scales from fp16's subnormal range to its largest value, rounding ties of the fp16 scale — and
    a layer fed through it equals one fed through torch, codes and group scales included."""
    g = torch.Generator().manual_seed(0)
    layer = _synthetic_layer(torch.full((3, 16), 8), 8, tail="int8")
    held = layer._encode_tail(torch.randn(2, 3, 5, 16, generator=g))
    x = torch.randn(2, 3, 400, 16, generator=g) * torch.logspace(-10, 4.7, 400).view(1, 1, 400, 1)
    x[0, 0, :3] = 0.0
    x[1, 1, 0] = 127 * 2.0**-14 * (1 + 2.0**-11)  # max/127 exactly halfway between two fp16 numbers: ties to even
    x[1, 1, 1] = 127 * 2.0**-14 * (1 + 3 * 2.0**-11)
    x = x.to(dtype)
    codes, scales = cpu_kernels.append_int8(*held, x)
    ref = layer._encode_tail(x)
    assert torch.equal(codes, torch.cat([held[0], ref[0]], dim=2))
    assert torch.equal(scales.view(torch.int16), torch.cat([held[1], ref[1]], dim=2).view(torch.int16))
    assert scales.float().min() == 2.0**-24 and scales.float().max() > 2.0**-14 * 1000  # the range was covered

    calls, append = [], cpu_kernels.append_int8
    monkeypatch.setattr(cpu_kernels, "append_int8", lambda *a: calls.append(1) or append(*a))

    def fed(use_kernel: bool) -> KVQuantLayer:
        monkeypatch.setattr(cpu_kernels, "available", lambda: (use_kernel, ""))
        calls.clear()
        lay = _synthetic_layer(torch.full((3, 16), 8), 8, tail="int8", sink=1)
        gen = torch.Generator().manual_seed(1)
        for n in (5, 1, 1, 9, 1):
            lay.update(torch.randn(2, 3, n, 16, generator=gen).to(dtype), torch.randn(2, 3, n, 16, generator=gen).to(dtype))
        assert len(calls) == (10 if use_kernel else 0)  # keys and values of each update through the C pass, or none
        return lay

    fast, slow = fed(True), fed(False)
    assert fast.quantized_tokens == 16 and fast.res_k.shape[2] == 1
    for name in ("res_k", "res_v", "k_codes", "v_codes", "v_scale", "sink_k"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    for name in ("res_k_scale", "res_v_scale", "k_mid", "k_half"):
        assert torch.equal(getattr(fast, name).view(torch.int16), getattr(slow, name).view(torch.int16)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["int8", "exact"])
def test_kernel_reads_and_writes_the_model_dtype_as_float32_would(dtype, tail):
    """The kernel reads a bf16/fp16 query, sinks and exact residual as held and writes its output in
    that dtype: bit for bit the float32 kernel on the same values, its output rounded by torch."""
    g = torch.Generator().manual_seed(5)
    low = _synthetic_layer(torch.full((2, 16), 16), 8, sink=2, tail=tail)
    for n in (13, 1, 4):
        low.update((torch.randn(2, 2, n, 16, generator=g) * 3).to(dtype), torch.randn(2, 2, n, 16, generator=g).to(dtype))
    assert low.res_k.dtype == (dtype if tail == "exact" else torch.int8) and low.sink_k.dtype == dtype
    high = copy.deepcopy(low)  # the same codes, its rows in the model's dtype upcast
    high.dtype = torch.float32
    for name in ("sink_k", "sink_v") + (("res_k", "res_v") if tail == "exact" else ()):
        setattr(high, name, getattr(low, name).float())
    q = torch.randn(2, 6, 1, 16, generator=g).to(dtype)
    mask = torch.rand(2, 1, 1, 18, generator=g) > 0.2
    for m in (None, mask):
        got = attend(low, q, m, 0.37, 0)
        assert got.dtype == dtype
        assert torch.equal(got, attend(high, q.float(), m, 0.37, 0).to(dtype))


def _check_every_level_count(scale_bits: int, tail: str, rows: int, values: str = "minmax", d: int = 24) -> None:
    counts = sorted(LEVEL_PACKING)
    levels = torch.tensor(counts * 8)[: 2 * d].view(2, d)
    layer = _synthetic_layer(levels, 16, sink=2, residual=3, scale_bits=scale_bits, bits_v=3, tail=tail, values=values)
    g = torch.Generator().manual_seed(0)
    for n in (20, 1, 30, 5):
        layer.update(torch.randn(3, 2, n, d, generator=g) * 3 + 1, torch.randn(3, 2, n, d, generator=g))
    assert layer.quantized_tokens == 48 and layer.res_k.shape[2] == 8
    k, v = layer._materialize()
    q = torch.randn(3, 2 * rows, 1, d, generator=g)
    for start in (0, 1, 21):
        visible = k.shape[2] - start
        mask = torch.rand(3, 1, 1, visible, generator=g) > 0.3
        mask[2] = False
        ref = F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:], attn_mask=mask, scale=0.3,
                                             enable_gqa=True).transpose(1, 2)
        ref[2] = 0.0  # a row with no allowed key attends to nothing
        got = attend(layer, q, mask, 0.3, start)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(attend(layer, q, None, None, start),
                                   F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:],
                                                                  enable_gqa=True).transpose(1, 2),
                                   atol=2e-5, rtol=1e-5)


def test_layout_checks_and_unreadable_layouts_dequantize():
    """Layouts the kernel does not read (static keys, exact values, groups not a multiple of 8)
    decode by dequantizing; a wrong mask is refused with its shape named."""
    model = make_model("llama")
    assert not make_cache(model, calibrated(model)).reads_codes()  # static per-head keys
    group4 = calibrated(model, norm="channel-group", group=4, sink=1)
    assert not make_cache(model, group4).reads_codes()
    books = calibrated(model, norm="channel-group", group=8, sink=1)
    assert not make_cache(model, books, quantize_values=False).reads_codes()
    assert not make_cache(model, books, decode="dequantize").reads_codes()
    with pytest.raises(ValueError, match="decode must be one of"):
        make_cache(model, books, decode="fast")
    cache = make_cache(model, books)
    with torch.no_grad():
        model(random_ids(1, 20), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(ValueError, match="bool mask over 20 keys"):
        attend(cache.layers[0], torch.randn(1, 4, 1, 16), torch.ones(1, 1, 1, 7, dtype=torch.bool), None, 0)


def test_without_the_kernel_make_cache_says_so_and_dequantizes(monkeypatch):
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=8, sink=1)
    monkeypatch.setattr(cpu_kernels, "available", lambda: (False, "no C compiler (test)"))
    with pytest.warns(UserWarning, match="no C compiler"):
        cache = make_cache(model, books)
    assert cache.options.decode == "dequantize" and not cache.reads_codes()


def test_kernel_build_is_cached_atomically_and_names_a_missing_compiler(monkeypatch, tmp_path):
    from kvquant.io.assets import cache_dir

    built = list((cache_dir() / "kernels").glob("decode_cpu-*.so"))
    assert built and not list((cache_dir() / "kernels").glob("*.tmp"))
    monkeypatch.setenv("KVQUANT_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc")
    cpu_kernels._library.cache_clear()
    try:
        ok, why = cpu_kernels.available()
        assert not ok and "no-such-cc" in why and "decode='dequantize'" in why
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.available()[0]


def test_rotation_plan_is_counted_and_rebuilt_when_groups_change():
    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=8, sink=1, rope="pre")
    cache = make_cache(model, books)
    layer = cache.layers[0]
    with torch.no_grad():
        out = model(random_ids(1, 15), **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, **cache_kwargs(cache), use_cache=True)  # token 16 completes group 1
        plan = layer._plan
        assert plan is not None and plan.base.shape[1] == 2 and plan.delta is None
        held = sum(t.untyped_storage().nbytes() for t in layer._tensors())
        assert layer.memory_bytes() == held + sum(t.untyped_storage().nbytes() for t in plan.tensors())
        # the δ tables and the groups' base tables are one copy for the cache's layers (same rope and
        # positions), counted once
        other = cache.layers[1]._plan
        shared = [plan.cosd, plan.sind, plan.base, plan.base_cos, plan.base_sin]
        assert all(a is b for a, b in zip(shared, [other.cosd, other.sind, other.base, other.base_cos, other.base_sin]))
        assert cache.memory_bytes() == sum(lay.memory_bytes() for lay in cache.layers) - sum(
            t.untyped_storage().nbytes() for t in shared)
        model(nxt, **cache_kwargs(cache), use_cache=True)
        assert layer._plan is plan  # same groups: kept
        for _ in range(8):
            model(nxt, **cache_kwargs(cache), use_cache=True)
        assert layer._plan is not plan and layer._plan.base.shape[1] == 3


# --- the Triton kernel on the same layout -----------------------------------------------------
# On the CPU the kernel runs under Triton's interpreter, which needs TRITON_INTERPRET=1 before
# triton is first imported (torch/transformers import it), so the cases run in a subprocess.


def run_triton_cases() -> list[tuple[str, float]]:
    """(case, max |Triton − C path| relative to max |C path|) for synthetic layers (every level
    count, 8- and 16-bit scales, rms, minmax and hadamard values, windows, masks, sinks) and a tiny Llama's
    and Gemma3's pre-RoPE caches (rotation computed in the kernel from positions, stored ones too)."""
    from kvquant.kernels import triton_decode

    results = []
    g = torch.Generator().manual_seed(0)
    counts = sorted(LEVEL_PACKING)
    for scale_bits, values, bits_v, tail, d in ((8, "minmax", 3, "exact", 24), (16, "rms", 4, "exact", 24),
                                                (8, "minmax", 8, "int8", 24), (8, "hadamard", 4, "int8", 32)):
        levels = torch.tensor(counts * 8)[: 2 * d].view(2, d)
        layer = _synthetic_layer(levels, 32, sink=2, residual=3, scale_bits=scale_bits, bits_v=bits_v, values=values,
                                 tail=tail)
        for n in (40, 1, 30, 30):
            layer.update(torch.randn(2, 2, n, d, generator=g) * 3 + 1, torch.randn(2, 2, n, d, generator=g))
        q = torch.randn(2, 6, 1, d, generator=g)
        for start, masked in ((0, False), (1, True), (45, True)):
            visible = layer.held_tokens - start
            mask = (torch.rand(2, 1, 1, visible, generator=g) > 0.3) if masked else None
            ref = attend(layer, q, mask, 0.3, start)
            got = triton_decode.decode_step(layer, q, mask, 0.3, start, block_t=16, num_splits=3)
            results.append((f"synthetic {scale_bits}-bit scales {values} V{bits_v} {tail} tail start {start}",
                            float((got - ref).abs().max() / ref.abs().max())))
    for family in ("llama", "gemma3"):
        model = make_model(family)
        books = calibrated(model, norm="channel-group", group=16, sink=1, scale_bits=8, rope="pre")
        ids = random_ids(2, 40)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        for padded in (False, True):
            cache = make_cache(model, books, decode="dequantize")
            am = mask if padded else None
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) if padded else None
            with torch.no_grad():
                model(ids, attention_mask=am, position_ids=pos, **cache_kwargs(cache), use_cache=True)
            layer = cache.layers[1]  # full attention in both
            assert (layer.k_pos is not None) == padded
            q = torch.randn(2, 4, 1, 16, generator=g) * 3
            kmask = None if am is None else am[:, None, None, :].bool()
            ref = attend(layer, q, kmask, None, 0)
            got = triton_decode.decode_step(layer, q, kmask, None, 0, block_t=16, num_splits=2)
            results.append((f"{family} pre-RoPE padded={padded}", float((got - ref).abs().max() / ref.abs().max())))
    return results


def under_triton(function: str):
    """``function()`` of this module under Triton's interpreter, on CPU tensors (a subprocess with
    ``TRITON_INTERPRET=1``, which must be set before triton is first imported), also where a GPU
    is present (eval/gpu_check.py runs the kernel on CUDA tensors); skips where triton does not
    import. Returns what it returns (JSON-serialisable)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton is not importable: {e}")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
        "import test_code_attention as t; from kvquant.kernels import triton_decode as td; ok, why = td.available(); "
        f"print(json.dumps({{'ok': ok, 'why': why, 'result': t.{function}() if ok else None}}))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ok"], res["why"]  # triton is installed: the interpreter must run
    return res["result"]


def test_triton_kernel_matches_the_c_path():
    results = [tuple(r) for r in under_triton("run_triton_cases")]
    bad = [(case, err) for case, err in results if not err <= 1e-4]
    assert len(results) == 16 and not bad, bad


def test_triton_unavailable_reason_is_clear(monkeypatch):
    try:
        from kvquant.kernels import triton_decode as td
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"kvquant.kernels.triton_decode does not import: {e}")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernel is available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = td.available()
    assert not ok and ("TRITON_INTERPRET" in why or "not importable" in why)


def test_a_copied_prompt_cache_decodes_like_the_original():
    """copy.deepcopy of a prefilled cache (transformers' prompt-reuse pattern) keeps reading the
    model's own modules for positions: both continue with the same logits."""
    import copy

    model = make_model("llama")
    books = calibrated(model, norm="channel-group", group=8, sink=1, rope="pre")
    ids = random_ids(1, 20)
    cache = make_cache(model, books)
    with torch.no_grad():
        model(ids[:, :17], **cache_kwargs(cache), use_cache=True)
        twin = copy.deepcopy(cache)
        assert twin.layers[0].rope.module is cache.layers[0].rope.module
        for t in range(17, 20):
            a = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits
            b = model(ids[:, t : t + 1], **cache_kwargs(twin), use_cache=True).logits
            assert torch.equal(a, b)


def run_generate_through_kernels() -> dict:
    """``generate()`` through a tiny model's pre-RoPE cache (GQA, a sliding layer for gemma3, batch
    2 with left padding, an exact sink, group 16, the exact tail: an INT8 one turns float rounding
    between the paths into code flips) with each decoding step read by the Triton kernel, by the C
    kernel and by the dequantize reference: tokens and the largest score difference."""
    out = {}
    for family in ("llama", "gemma3"):
        model = make_model(family)
        books = calibrated(model, norm="channel-group", group=16, sink=1, scale_bits=8, rope="pre")
        ids = random_ids(2, 14)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        runs = {}
        for name, kw in (("triton", dict(kernel="triton")), ("c", dict(kernel="c")), ("dequantize", dict(decode="dequantize"))):
            cache = make_cache(model, books, tail="exact", **kw)
            routed = []
            for layer in cache.layers:
                real = layer.decode_attention

                def counted(*args, real=real):
                    routed.append(1)
                    return real(*args)

                layer.decode_attention = counted
            gen = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=20, min_new_tokens=20,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
            runs[name] = (gen.sequences, torch.stack(gen.scores), len(routed))
        tri, c, ref = runs["triton"], runs["c"], runs["dequantize"]

        def diff(a, b):  # scores masked to -inf (min_new_tokens masks EOS) must be masked alike
            finite = torch.isfinite(b)
            return float((a - b)[finite].abs().max()) if torch.equal(torch.isfinite(a), finite) else float("inf")

        out[family] = {
            "tokens_equal": bool(torch.equal(tri[0], c[0]) and torch.equal(c[0], ref[0])),
            "max_score_diff": max(diff(tri[1], ref[1]), diff(c[1], ref[1])),
            "steps_from_codes": [tri[2], c[2], ref[2]],
        }
    return out


def test_generate_with_the_triton_kernel_equals_the_c_kernel_and_the_reference():
    """make_cache(kernel="triton") on CPU tensors (Triton's interpreter): generate() reads every
    one-token step of every layer from the codes with the Triton kernel, and gives the C kernel's
    and the dequantize reference's tokens."""
    res = under_triton("run_generate_through_kernels")
    for family, r in res.items():
        layers = 2
        assert r["steps_from_codes"] == [19 * layers, 19 * layers, 0], (family, r)  # 19 one-token steps each
        assert r["tokens_equal"] and r["max_score_diff"] < 1e-3, (family, r)
