"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


class MLP(nn.Module):
    """A plain PyTorch model: LoRA must work without transformers too."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.up = nn.Linear(24, 48)
        self.down = nn.Linear(48, 24)
        self.head = nn.Linear(24, VOCAB, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


# family -> (builder, targets that exist in it, an embedding name)
FAMILIES = {
    "llama": (_llama, ["q_proj", "v_proj"], "embed_tokens"),
    "qwen2": (_qwen2, ["q_proj", "k_proj", "v_proj", "o_proj"], "embed_tokens"),
    "gpt2": (_gpt2, ["c_attn", "c_proj"], "wte"),
    "mlp": (MLP, ["up", "down"], "embed"),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family][0]()
    model.eval()
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Make every adapter's update non-zero (B starts at zero), so tests see a real effect."""
    import lorakit

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for table in (layer.lora_A, layer.lora_B):
                for p in table.values():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def perturb_trainables(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add random values to everything that trains (A, B, magnitudes, lora biases, token rows, saved copies),
    so outputs and saved files see each of those tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


TOKENIZER_TEXT = (
    "The ship sailed at dawn. The captain saw the red sky and said: we sail north.\n"
    "In the beginning was the word, and the word was with the crew.\n"
    "A computer program reads input, computes, and writes output. Hackers say foo and bar.\n"
) * 20


def make_tiny_base(directory, vocab_size: int = 300, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random tiny Llama + byte-level BPE tokenizer saved as a transformers directory.

    Same special tokens as the embedded base (<s>, </s>, <pad>), so code paths are the same.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Path of a tiny random causal LM directory with its own tokenizer (built once per session)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


# -- precision policy ------------------------------------------------------------------------------
# `--dtype auto` picks bf16 or fp32 by the CPU (lorakit.base.cpu_has_fast_bf16; LORAKIT_CPU_BF16=0|1
# overrides it). A test that compares numbers pins its precision; a test that goes through `auto` on
# purpose carries the `auto_dtype` marker, and `make test` runs those under both policies. This guard
# keeps the rule true: a test that resolves `auto` without the marker fails.


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs a worker per core: one thread for each worker and for the processes its tests start
        # (torchrun ranks, servers, killed runs). With torch's own count the thread pools fight over the cores
        # (measured on 2 cores: the demo's test, 173 s alone, hit the 600 s timeout).
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "auto_dtype: resolves --dtype auto (the CPU policy); `make test` runs "
                                       "these under both LORAKIT_CPU_BF16=0 and =1")


def pytest_collection_modifyitems(config, items):
    """The `slow` tests first: the workers of `make test` (`--dist load`) take them round-robin at the start, so
    no worker meets a minutes-long test near the end while the other sits idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _auto_dtype_is_declared(request, monkeypatch):
    import lorakit.base

    asked = []
    policy = lorakit.base.cpu_has_fast_bf16
    monkeypatch.setattr(lorakit.base, "cpu_has_fast_bf16", lambda: asked.append(True) or policy())
    yield
    if asked and request.node.get_closest_marker("auto_dtype") is None:
        pytest.fail("this test let --dtype auto choose its precision: pin it (e.g. --dtype fp32) or mark the "
                    "test @pytest.mark.auto_dtype so that it runs under both CPU policies", pytrace=False)
