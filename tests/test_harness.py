"""kvquant.evaluation.harness: lm-eval's model type ``kvquant`` runs tasks through kvquant's KV cache.

Offline: a tiny random Llama with the tests' word-level tokenizer saved to a tmp folder (loaded
back by ``kvquant.io.assets.load_model`` as any local folder), 2-bit codebooks calibrated on it, and
the two tiny tasks of tests/data/lm_eval_task (multiple choice, greedy generation). Every number
the harness reports is checked against a computation that does not go through lm-eval: token by
token through a fresh cache, ``kvquant.evaluation.generation.generation_nll``, the plain model's log-probs.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# an optional extra: without it (pip install -e ".[dev]") these tests skip, the rest of the suite runs
lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (the "lm-eval" extra: pip install -e ".[lm-eval]")')

import torch  # noqa: E402
from conftest import make_model, make_tokenizer, random_ids  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import Registry, get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvquant.io.assets import load_model  # noqa: E402
from kvquant.cache import KVQuantCache, make_cache  # noqa: E402
from kvquant.hf.calibrate import CalibrationConfig, calibrate  # noqa: E402
from kvquant.codebooks import CodebookConfig  # noqa: E402
from kvquant.hf.compat import cache_kwargs  # noqa: E402
from kvquant.evaluation.generation import generation_nll  # noqa: E402
from kvquant.evaluation.harness import KVQuantLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"  # its YAMLs name the data files relative to ROOT
TASKS = ["kvquant_tiny_mc", "kvquant_tiny_gen"]
BITS_V = 2
BOS = 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    """A tiny Llama + tokenizer in a folder, codebooks for it (2-bit keys in groups of 4 tokens,
    pre-RoPE, the first token exact) in a file, and the model as loaded back from the folder."""
    tmp = tmp_path_factory.mktemp("harness")
    model = make_model("llama")
    model.save_pretrained(tmp / "model")
    make_tokenizer().save_pretrained(tmp / "model")
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig(
        "lambda", 2, 2, norm="channel-group", group=4, sink=1, rope="pre")), progress=False)
    books.save(tmp / "books.safetensors")
    ref, tok = load_model(str(tmp / "model"))
    return SimpleNamespace(model=str(tmp / "model"), codebooks=str(tmp / "books.safetensors"), books=books, ref=ref,
                           tok=tok)


@pytest.fixture(scope="module")
def lm_q(assets) -> KVQuantLM:
    return KVQuantLM(pretrained=assets.model, codebooks=assets.codebooks, bits_v=BITS_V, device="cpu")


@pytest.fixture(scope="module")
def lm_fp(assets) -> KVQuantLM:
    return KVQuantLM(pretrained=assets.model, device="cpu")


@torch.no_grad()
def stepwise_logprobs(model, ids: list[int], cache) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for t = 0 … n−2, one token per forward through ``cache``."""
    out = []
    for t in range(len(ids) - 1):
        logits = model(torch.tensor([ids[t : t + 1]]), **cache_kwargs(cache), use_cache=True).logits[0, -1]
        out.append(logits.float().log_softmax(-1)[ids[t + 1]])
    return torch.stack(out)


def quantized_cache(assets):
    return make_cache(assets.ref, assets.books, bits_v=BITS_V)


def spy_caches(monkeypatch) -> list:
    """Record every cache KVQuantLM hands out."""
    made, new = [], KVQuantLM.new_cache

    def spy(self):
        made.append(new(self))
        return made[-1]

    monkeypatch.setattr(KVQuantLM, "new_cache", spy)
    return made


def test_tasks_run_through_the_quantized_cache(assets, monkeypatch):
    """lm-eval's Python API with model="kvquant": both tasks run, every request went through a
    KVQuantCache, and each choice's loglikelihood and each generation equal what the quantized
    cache gives token by token / through model.generate outside lm-eval."""
    monkeypatch.chdir(ROOT)
    made = spy_caches(monkeypatch)
    out = lm_eval.simple_evaluate(
        model="kvquant",
        model_args=f"pretrained={assets.model},codebooks={assets.codebooks},bits_v={BITS_V},device=cpu,batch_size=1",
        batch_size=1, device="cuda:0",  # what lm-eval's command line passes by default: model_args win
        tasks=TASKS, task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        bootstrap_iters=0, log_samples=True,
    )
    res = out["results"]
    assert res["kvquant_tiny_mc"]["sample_len"] == 6 and 0.0 <= res["kvquant_tiny_mc"]["acc,none"] <= 1.0
    assert res["kvquant_tiny_gen"]["sample_len"] == 3 and "exact_match,none" in res["kvquant_tiny_gen"]
    assert out["config"]["kvquant_cache"] == "KVQuantCache" and out["config"]["kvquant_cache_options"] == {"bits_v": BITS_V}
    assert made and all(type(c) is KVQuantCache for c in made)
    assert all(c.options.bits_v == BITS_V for c in made)

    tok = assets.tok
    mc = out["samples"]["kvquant_tiny_mc"]
    assert len(mc) == 6
    correct = []
    for sample in mc:
        doc = sample["doc"]
        ctx = tok(doc["query"]).input_ids
        want = []
        for choice, ((ll, _greedy),) in zip(doc["choices"], sample["resps"], strict=True):
            ids = tok(doc["query"] + " " + choice).input_ids
            want.append(float(stepwise_logprobs(assets.ref, ids, quantized_cache(assets))[len(ctx) - 1 :].sum()))
            # chunked (lm-eval) vs one token at a time: other matmul shapes, so a 2-bit code may flip on a last bit
            assert ll == pytest.approx(want[-1], abs=1e-3), (doc["query"], choice)
        correct.append(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert res["kvquant_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    for sample in out["samples"]["kvquant_tiny_gen"]:
        enc = tok(sample["doc"]["query"], return_tensors="pt")
        cache = quantized_cache(assets)
        with torch.no_grad():
            ref = assets.ref.generate(**enc, **cache_kwargs(cache), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert cache.get_seq_length() > enc.input_ids.shape[1]
        assert sample["resps"] == [[tok.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)]]


def test_generate_until_passes_a_fresh_quantized_cache_to_generate(assets, lm_q, monkeypatch):
    """One generate_until request: one fresh KVQuantCache, filled by model.generate as the same
    greedy generation outside lm-eval fills it, and the same text."""
    made = spy_caches(monkeypatch)
    args = ("w40 w41 w42 w43 w44 w45 w46 w47", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})
    (text,) = lm_q.generate_until([Instance("generate_until", {}, args, 0)], disable_tqdm=True)
    enc = assets.tok(args[0], return_tensors="pt")
    cache = quantized_cache(assets)
    with torch.no_grad():
        ref = assets.ref.generate(**enc, **cache_kwargs(cache), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert [type(c) for c in made] == [KVQuantCache]
    assert made[0].get_seq_length() == cache.get_seq_length() == ref.shape[1] - 1 > enc.input_ids.shape[1]
    assert text == assets.tok.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def rolling(lm: KVQuantLM, text: str) -> float:
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]


def test_loglikelihood_equals_generation_mode_nll_and_fp_the_plain_model(assets, lm_q, lm_fp, monkeypatch):
    """A rolling loglikelihood (one window: BOS + 40 tokens) is −generation_nll of the same tokens
    through the quantized cache; without codebooks it is the plain model's full-forward log-prob
    (DynamicCache), and the two differ: the keys and values really were quantized."""
    words = [f"w{(7 * i + 3) % 120}" for i in range(40)]
    text = " ".join(words)
    ids = [BOS] + assets.tok(text).input_ids
    assert len(ids) == 41 and lm_q.max_length >= 41  # one window

    made = spy_caches(monkeypatch)
    q = rolling(lm_q, text)
    assert [type(c) for c in made] == [KVQuantCache] and made[0].get_seq_length() == 40
    total, count, _ = generation_nll(assets.ref, torch.tensor([ids]), lambda: quantized_cache(assets), progress=False)
    assert count == 40 and q == pytest.approx(-total, rel=1e-5)

    fp = rolling(lm_fp, text)
    assert [type(c) for c in made[1:]] == [DynamicCache]
    with torch.no_grad():
        logp = assets.ref(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    plain = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert fp == pytest.approx(plain, abs=1e-4)
    assert abs(q - fp) > 0.05  # 2-bit keys and values move the result far beyond rounding


def test_batches_equal_one_request_at_a_time(lm_q, monkeypatch):
    """Right-padded batches (rows of different lengths, each through its own cache) give what
    one request at a time gives."""
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate([
        ("w5 w6 w7 w8 w9", " w10 w11"), ("w1", " w2"), ("w30 w31 w32 w33 w34 w35 w36 w37 w38", " w39 w40 w41 w42"),
        ("w60 w61 w62", " w63"),
    ])]
    one = lm_q.loglikelihood(reqs, disable_tqdm=True)
    monkeypatch.setattr(lm_q, "batch_size_per_gpu", 3)
    batched = lm_q.loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in one], abs=1e-5)


def test_bad_model_args_name_the_fix(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown model_args for --model kvquant: bits_k; known: pretrained"):
        KVQuantLM(pretrained=assets.model, codebooks=assets.codebooks, bits_k=4)
    with pytest.raises(ValueError, match="bits_v set kvquant's quantized cache: add codebooks=FILE"):
        KVQuantLM(pretrained=assets.model, bits_v=4)
    with pytest.raises(FileNotFoundError, match="kvquant calibrate"):
        KVQuantLM(pretrained=assets.model, codebooks=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="dtype='fp32': use auto or one of float32"):
        KVQuantLM(pretrained=assets.model, dtype="fp32")
    with pytest.raises(ValueError, match="values='absmax': use one of hadamard, minmax, rms"):  # before the model loads
        KVQuantLM(pretrained=assets.model, codebooks=assets.codebooks, values="absmax")


def only_tiny_tasks(monkeypatch) -> None:
    """The command line indexes lm-eval's ~15k built-in task configs first (14 s here): skip those
    (the tiny tasks' YAMLs name their data files relative to ROOT). lm-eval's log handler, made
    once per process, writes to this test's stderr (not an earlier test's closed capture)."""
    import logging

    from lm_eval.utils import setup_logging

    setup_logging()
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # lm-eval's (not pytest's capture handlers)
            handler.stream = sys.__stderr__  # where it is left after the test
            monkeypatch.setattr(handler, "stream", sys.stderr)
    real_manager = TaskManager
    monkeypatch.setattr("lm_eval.tasks.TaskManager",
                        lambda include_path=None, **kw: real_manager(include_path=include_path, include_defaults=False, **kw))
    monkeypatch.chdir(ROOT)


@pytest.mark.filterwarnings("ignore:'kvquant.evaluation.harness' found in sys.modules:RuntimeWarning")  # runpy: already imported
def test_registration_entry_point_and_command_line(assets, monkeypatch, tmp_path, capsys):
    """lm-eval resolves "kvquant" once kvquant.evaluation.harness is imported; pyproject's entry point
    (group lm_eval.models) loads the same class, also as a lazy registry placeholder (what entry-
    point discovery in lm-eval would register); `python -m kvquant.evaluation.harness ARGS` runs lm-eval's
    command line with it."""
    assert get_model("kvquant") is KVQuantLM
    declared = re.search(r'\[project\.entry-points\."lm_eval\.models"\]\nkvquant = "([^"]+)"',
                         (ROOT / "pyproject.toml").read_text())
    ep = importlib.metadata.EntryPoint("kvquant", declared.group(1), "lm_eval.models")
    assert ep.load() is KVQuantLM
    reg = Registry("model", base_cls=LM)
    reg.register("kvquant", target=ep)
    assert reg.get("kvquant") is KVQuantLM

    only_tiny_tasks(monkeypatch)
    monkeypatch.setattr(sys, "argv", [
        "kvquant.evaluation.harness", "--model", "kvquant", "--model_args",
        f"pretrained={assets.model},codebooks={assets.codebooks},bits_v={BITS_V},device=cpu,batch_size=1",
        "--tasks", "kvquant_tiny_mc", "--include_path", str(TASK_DIR), "--output_path", str(tmp_path / "out"),
    ])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("kvquant.evaluation.harness", run_name="__main__")
    assert done.value.code == 0
    assert "kvquant_tiny_mc" in capsys.readouterr().out
    (result,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(result.read_text())
    assert data["config"]["kvquant_cache"] == "KVQuantCache"
    assert 0.0 <= data["results"]["kvquant_tiny_mc"]["acc,none"] <= 1.0


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    """A tiny Qwen2 folder: the Llama's codebooks do not fit it."""
    folder = tmp_path_factory.mktemp("other") / "qwen2"
    make_model("qwen2").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def no_model_loads(monkeypatch) -> None:
    """Fail where KVQuantLM loads a model: its argument checks come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("KVQuantLM loaded a model before it checked its model_args")

    monkeypatch.setattr("kvquant.io.assets.load_model", refuse)


@pytest.mark.parametrize("arg, match", [
    ("bits_v=9", r"^model_args bits_v=9: use a whole number 1–8 \(the bits of each cached value, e\.g\. bits_v=4; "
                 r"leave bits_v out for the codebook file's\)$"),
    ("bits_v=banana", r"^model_args bits_v='banana': use a whole number 1–8 "),
    ("bits_v=2.5", r"^model_args bits_v=2\.5: use a whole number 1–8 "),
    ("bits_v=0", r"^model_args bits_v=0: use a whole number 1–8 "),
    ("bits_v=true", r"^model_args bits_v=True: use a whole number 1–8 "),
    ("residual=x", r"^model_args residual='x': use a whole number >= 0 "),
    ("sink=-1", r"^model_args sink=-1: use a whole number >= 0 "),
    ("quantize_values=3", r"^model_args quantize_values=3: use true or false$"),
    ("values=absmax", r"^model_args values='absmax': use one of hadamard, minmax, rms$"),
    ("decode=fast", r"^model_args decode='fast': use one of codes, dequantize$"),
    ("dtype=3", r"^model_args dtype=3: use auto or one of float32, bfloat16, float16$"),
    ("batch_size=banana", r"^model_args batch_size='banana' \(or --batch_size\): use a whole number >= 1 or auto "),
    ("batch_size=0", r"^model_args batch_size=0 "),
    ("max_length=banana", r"^model_args max_length='banana': use a whole number >= 1 "),
    ("logits_cache=maybe", r"^model_args logits_cache='maybe': use true or false$"),
    ("codebooks=true", r"^model_args codebooks=True is not a file: give the \.safetensors file of `kvquant calibrate`, "
                       r"or leave codebooks out"),
])
def test_model_args_of_a_wrong_type_or_range_name_key_value_and_fix_before_any_model_loads(assets, monkeypatch, arg,
                                                                                            match):
    """As lm-eval parses --model_args ("9" an int, "banana" a str, "true" a bool): each bad value
    is a ValueError naming the key, the value and what to write, raised before the model loads."""
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        KVQuantLM.create_from_arg_string(f"pretrained={assets.model},codebooks={assets.codebooks},device=cpu,{arg}")


def test_model_args_as_strings_are_accepted(assets):
    """JSON --model_args and lm-eval's --batch_size give numbers as strings: taken as the numbers."""
    lm = KVQuantLM.create_from_arg_obj({"pretrained": assets.model, "codebooks": assets.codebooks, "bits_v": "3",
                                        "quantize_values": "true", "device": "cpu"}, {"batch_size": "2"})
    assert lm.kv_options == {"bits_v": 3, "quantize_values": True} and lm.batch_size == 2
    assert lm.new_cache().options.bits_v == 3


@pytest.mark.parametrize("build", [
    lambda a: KVQuantLM(device="cpu"),
    lambda a: KVQuantLM(pretrained="", codebooks=a.codebooks),
    lambda a: KVQuantLM.create_from_arg_string(f"codebooks={a.codebooks},device=cpu"),
    lambda a: KVQuantLM.create_from_arg_string("pretrained=None,device=cpu"),
    lambda a: KVQuantLM.create_from_arg_obj({}, {"batch_size": 1, "device": "cuda:0"}),  # lm-eval without --model_args
], ids=["no-args", "empty", "string-without", "none", "dict-without"])
def test_pretrained_is_required(assets, monkeypatch, build):
    """No pretrained= is an error naming it (not the quiet default model), before any model loads."""
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"^model_args pretrained= is required: the model to evaluate, "
                                         r"e\.g\. pretrained=smollm2-135m \(offline names: smollm2-135m, .*\), "
                                         r"a local model folder or a hub id$"):
        build(assets)


def test_codebook_file_errors_name_model_args_codebooks(assets, other_model, tmp_path):
    """No file, not a codebook file, codebooks for another model, a cache option the codebooks
    refuse: each error names codebooks= (and the option) and the fix."""
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^model_args codebooks={re.escape(str(missing))}: no codebook file "
                                                r"at .*; create one with `kvquant calibrate --out .*`, or leave "
                                                r"codebooks out to run the unquantized model$"):
        KVQuantLM(pretrained=assets.model, codebooks=str(missing), device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"^model_args codebooks={re.escape(str(junk))}: .* is not a safetensors "
                                         r"file"):
        KVQuantLM(pretrained=assets.model, codebooks=str(junk), device="cpu")
    with pytest.raises(ValueError, match=rf"(?s)^model_args codebooks={re.escape(assets.codebooks)} do not fit "
                                         rf"pretrained={re.escape(other_model)} \(pass the codebooks calibrated for "
                                         r"it\): codebooks were calibrated for llama .*model has 'qwen2'"):
        KVQuantLM(pretrained=other_model, codebooks=assets.codebooks, device="cpu")
    with pytest.raises(ValueError, match=rf"^model_args codebooks={re.escape(assets.codebooks)}, sink=5: sink \(5\) "
                                         r"must be smaller than group \(4\)"):
        KVQuantLM(pretrained=assets.model, codebooks=assets.codebooks, sink=5, device="cpu")


@pytest.mark.parametrize("model_args, message", [
    ("pretrained={model},codebooks={codebooks},bits_v=9,device=cpu", "model_args bits_v=9: use a whole number 1–8 ("),
    ("pretrained={model},codebooks={codebooks},bits_v=banana,device=cpu", "model_args bits_v='banana': use a whole "),
    ("pretrained={model},codebooks={codebooks},bits_k=4,device=cpu",
     "unknown model_args for --model kvquant: bits_k; known: pretrained, codebooks, bits_v,"),
    ("pretrained={model},codebooks={missing},device=cpu", "model_args codebooks={missing}: no codebook file at "),
    ("pretrained={other},codebooks={codebooks},device=cpu",
     "model_args codebooks={codebooks} do not fit pretrained={other} (pass the codebooks calibrated for it): "
     "codebooks were calibrated for llama and do not fit this model: - model_type: "),
    ("device=cpu", "model_args pretrained= is required: "),
    (None, "model_args pretrained= is required: "),
], ids=["bits_v-9", "bits_v-banana", "unknown-key", "no-codebook-file", "other-model", "no-pretrained",
        "no-model_args"])
def test_command_line_user_errors_are_one_line_and_exit_2(assets, other_model, monkeypatch, tmp_path, capsys,
                                                         model_args, message):
    """`python -m kvquant.evaluation.harness --model kvquant --model_args ...` with a user error: exit status 2,
    the last line of stderr `kvquant.evaluation.harness: error: <message>` (multi-line messages joined), no
    traceback."""
    from kvquant.evaluation.harness import main

    only_tiny_tasks(monkeypatch)
    names = dict(model=assets.model, codebooks=assets.codebooks, other=other_model,
                 missing=str(tmp_path / "missing.safetensors"))
    args = [] if model_args is None else ["--model_args", model_args.format(**names)]
    code = main(["--model", "kvquant", *args, "--tasks", "kvquant_tiny_mc", "--include_path", str(TASK_DIR)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.endswith("\n") and err.splitlines()[-1].startswith("kvquant.evaluation.harness: error: " + message.format(**names))
