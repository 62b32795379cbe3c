"""Tokenizer, model shape, pretraining loop and evaluation for the embedded base model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): every byte string is encodable and decodes back exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama, encoding prepends <s>; pretraining documents are "<s> text </s>".
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=max_length, clean_up_tokenization_spaces=False,
    )


def check_round_trip(tokenizer: PreTrainedTokenizerFast, samples: list[str]) -> None:
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if back != text:
            raise AssertionError(f"tokenizer does not round-trip {text[:80]!r}: got {back[:80]!r}")


def encode_documents(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> np.ndarray:
    """One token stream: <s> doc </s> <s> doc </s> ... as uint16."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(docs)["input_ids"]  # each starts with <s>
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.uint16)
    return stream


# ---------------------------------------------------------------------------------------
# Model and pretraining
# ---------------------------------------------------------------------------------------

@dataclass
class Shape:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 512


def make_model(shape: Shape, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # the embedding is a third of the model; tying keeps it small
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(stream: np.ndarray, step: int, cfg: TrainConfig) -> torch.Tensor:
    """Random windows of seq_len tokens; a function of (seed, step) so a resumed run sees
    exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - cfg.seq_len, size=cfg.batch_size)
    return torch.from_numpy(np.stack([stream[s:s + cfg.seq_len] for s in starts]).astype(np.int64))


def autocast(device: torch.device):
    # bf16 autocast only where the hardware runs bf16 matmuls natively; on a CPU without
    # AMX / AVX-512 BF16 (like the 2-core AVX2 machine this was built on) it is ~40x slower.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and torch.cuda.is_bf16_supported())


def pretrain(model: LlamaForCausalLM, stream: np.ndarray, cfg: TrainConfig, device: torch.device,
             checkpoint: Path, log) -> dict:
    """AdamW pretraining on random windows of `stream`; resumes from `checkpoint` if present."""
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    start, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        log(f"resumed from {checkpoint} at step {start}")

    t0, window_loss = time.time() - elapsed, []
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = batch_at(stream, step, cfg).to(device)  # (B, T)
        with autocast(device):
            loss = model(input_ids=x, labels=x).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss.append(loss.item())

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            spent = time.time() - t0
            tokens = done * cfg.batch_size * cfg.seq_len
            log(f"step {done}/{cfg.steps} loss {np.mean(window_loss):.3f} lr {lr_at(step, cfg):.2e} "
                f"tokens {tokens / 1e6:.2f}M {tokens / spent:.0f} tok/s elapsed {spent / 60:.1f} min")
            window_loss = []
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                        "elapsed": time.time() - t0}, tmp)
            tmp.replace(checkpoint)  # atomic: a crash mid-save keeps the previous checkpoint
    spent = time.time() - t0 if start < cfg.steps else elapsed
    return {"steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            "seconds": spent}


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int, device: torch.device) -> float:
    """exp(mean next-token loss) over non-overlapping seq_len windows of "<s> text"."""
    model.eval()
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    total, count = 0.0, 0
    for i in range(0, len(ids) - 1, seq_len):
        x = ids[i:i + seq_len].unsqueeze(0).to(device)  # (1, T)
        if x.shape[1] < 2:
            break
        with autocast(device):
            loss = model(input_ids=x, labels=x).loss.float()
        n = x.shape[1] - 1
        total += loss.item() * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, device) -> str:
    torch.manual_seed(seed)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, do_sample=True, temperature=0.8, top_k=50,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
