"""Shared fixtures: tiny randomly initialised causal LMs of every supported family.

Every model has 2 layers, hidden size 64, vocabulary 128 and head_dim 16, is in eval mode and
float32. GQA families (Llama, Qwen2, Mistral, Gemma3) have 4 query heads over 2 KV heads.
Sliding windows (Mistral: every layer; Qwen2: layer 1; Gemma3: layer 0) are ``WINDOW`` = 4
tokens, smaller than the ``SEQ`` = 12 token sequences the tests use, so windowed and causal
patterns really differ. Weights are scaled up (``initializer_range`` 0.2) so that attention is
far from uniform and masking mistakes show in the logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

transformers.logging.set_verbosity_error()

VOCAB = 128
SEQ = 12
WINDOW = 4
HEAD_DIM = 16
FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "gptneox")
GQA_FAMILIES = ("llama", "qwen2", "mistral", "gemma3")

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=64, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_SPECS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(_DECODER)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(_DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(_DECODER, sliding_window=WINDOW)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               dict(_DECODER, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "gpt2": (GPT2Config, GPT2LMHeadModel,
             dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2)),
    "gptneox": (GPTNeoXConfig, GPTNeoXForCausalLM,
                dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
}
#: Sliding window per layer, written down from the configs above (not read back from the model),
#: so the tests' brute-force pair sets are independent of kvquant and transformers.
EXPECTED_WINDOWS = {
    "llama": [None, None],
    "qwen2": [None, WINDOW],
    "mistral": [WINDOW, WINDOW],
    "gemma3": [WINDOW, None],
    "gpt2": [None, None],
    "gptneox": [None, None],
}


def make_config(family: str, **overrides):
    cfg_cls, _, kwargs = _SPECS[family]
    return cfg_cls(**{**kwargs, **overrides})


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny model of ``family`` (eval, float32, SDPA attention)."""
    _, model_cls, _ = _SPECS[family]
    config = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    assert model.config._attn_implementation == "sdpa"
    return model


def random_ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def left_padded(batch: int = 2, seq: int = SEQ, pads: tuple[int, ...] = (0, 3), seed: int = 1):
    """Token ids and a 2-D attention mask where row i has ``pads[i]`` padding tokens on the left."""
    ids = random_ids(batch, seq, seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i, p in enumerate(pads):
        ids[i, :p] = 0
        mask[i, :p] = 0
    return ids, mask


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Run the tests on one torch thread. The models here are tiny or run one window at a time,
    and on a small shared machine OpenMP threads mostly wait for each other: a 64×64 linear took
    16 ms on 2 threads vs 9 µs on 1, a SmolLM2 window 5–9 s vs 0.8 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family) -> torch.nn.Module:
    return make_model(family)


@pytest.fixture
def llama() -> torch.nn.Module:
    return make_model("llama")


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


def make_tokenizer():
    """An offline word-level tokenizer over a small fixed vocabulary (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 4)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def text_of(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-random text in the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB - 4, (n_words,), generator=g).tolist()
    lines = [" ".join(f"w{i}" for i in idx[j : j + 16]) for j in range(0, n_words, 16)]
    return "\n".join(lines) + "\n"


def tiny_books(**cfg):
    """(model, ids, codebooks): a 2-layer Llama (4 query heads, 2 KV heads, head_dim 8) calibrated
    on random ids (2 × 24) with ``CodebookConfig(**cfg)``."""
    from kvquant.hf.calibrate import CalibrationConfig, calibrate
    from kvquant.codebooks import CodebookConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    ids = torch.randint(0, 64, (2, 24))
    return model, ids, calibrate(model, ids, CalibrationConfig(CodebookConfig(**cfg)), progress=False)


def damaged_copy(src, dst, edit):
    """A copy of the codebook file ``src`` at ``dst`` with ``edit(tensors, metadata)`` applied
    (both dicts, edited in place): a file kvquant must refuse on load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model folder (what ``--model`` takes)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A 400-word text file (``--text-file``)."""
    path = tmp_path / "corpus.txt"
    path.write_text(text_of(400), encoding="utf-8")
    return path


def pytest_collection_modifyitems(config, items):
    """Integration tests convert the offline GGUF models: without the ``gguf`` extra they skip, with
    the reason, rather than fail (the unit tests need no extra but ``dev``)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is not None:
        return
    skip = pytest.mark.skip(reason='the gguf extra is not installed (pip install -e ".[gguf]"): the offline '
                                   "models cannot be converted")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(autouse=True)
def _alone(monkeypatch):
    """A test is one process, whatever launched the suite: torchrun / SLURM / accelerate variables
    would make calibration join (or wait for) a process group."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
