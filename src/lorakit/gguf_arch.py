"""llama.cpp's view of a transformers architecture: GGUF tensor names, hyperparameters, Q/K row order.

The facts come from llama.cpp itself (convert_hf_to_gguf.py, src/models/{llama,qwen2,gpt2}.cpp,
src/llama-adapter.cpp) and are checked by loading our files in llama.cpp (tests/test_gguf.py):

- Tensors are renamed per module (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`) and keep
  their `.weight` / `.bias` suffix; a LoRA pair becomes `<gguf name>.weight.lora_a` / `.lora_b`.
- A GGUF 2-D tensor is stored with PyTorch's (out, in) layout (ggml calls it ne = {in, out}), so
  Linear weights and LoRA's A (r, in) and B (out, r) go in unchanged; GPT-2's Conv1D weights are
  stored (in, out) and are transposed.
- llama.cpp's Llama runs rope on interleaved pairs, transformers' on two halves: Q and K rows are
  reordered head by head (`permute_rows`); a LoRA B for q/k gets the same row order, since
  P·(W + B·A) = P·W + (P·B)·A. Qwen2 uses llama.cpp's NeoX rope, which needs no reordering.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lorakit.errors import UserError


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first half | second half] to interleaved pairs (llama.cpp's rope order).

    Works on a weight (out, in), a bias (out,) or a LoRA B (out, r): only dim 0 moves.
    """
    # (heads, 2, head_dim/2, ...) -> (heads, head_dim/2, 2, ...): row j of a half goes next to its twin
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class Arch:
    """How one transformers architecture maps onto one llama.cpp architecture."""

    name: str
    """general.architecture in GGUF (llama.cpp's name)."""
    modules: tuple[tuple[str, str], ...]
    """(regex over a transformers module path, GGUF name with {} for the layer index)."""
    skip: tuple[str, ...]
    """Regexes of checkpoint tensors llama.cpp has no use for (buffers saved by old versions)."""
    hparams: Callable[[dict[str, Any]], dict[str, Any]]
    """config.json -> {GGUFWriter method name without 'add_': value}; refuses what llama.cpp can't run."""
    rope_heads: Callable[[dict[str, Any]], dict[str, int]] | None = None
    """GGUF module -> heads, for the modules whose rows `permute_rows` reorders (Llama's Q and K)."""
    conv1d: tuple[str, ...] = ()
    """GGUF modules whose transformers weight is (in, out) (GPT-2's Conv1D): transposed on the way."""
    prefix: str = ""
    """A leading path part some checkpoints have and others lack (GPT-2's 'transformer.')."""
    tied_default: bool = False
    """tie_word_embeddings when config.json does not say (transformers' default for the class)."""

    def gguf_module(self, path: str) -> str | None:
        """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q'; None for a module llama.cpp lacks."""
        path = path.removeprefix(self.prefix) if self.prefix else path
        for pattern, name in self.modules:
            m = re.fullmatch(pattern, path)
            if m:
                return name.format(*m.groups())
        return None

    def skipped(self, tensor: str) -> bool:
        return any(re.fullmatch(p, tensor.removeprefix(self.prefix)) for p in self.skip)

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", self.tied_default))


def _require(config: dict[str, Any], key: str, allowed: tuple, what: str) -> None:
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise UserError(f"{what} {key}={value!r} is not supported by the GGUF export "
                        f"(llama.cpp runs {', '.join(map(repr, allowed))})")


def _rope(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """rope theta and scaling from config.json (transformers 4: rope_theta + rope_scaling; 5: rope_parameters)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_freq_base": float(params.get("rope_theta", config.get("rope_theta", 10000.0)))}
    if kind == "linear":
        from gguf import RopeScalingType

        out["rope_scaling_type"] = RopeScalingType.LINEAR
        out["rope_scaling_factor"] = float(params["factor"])
    elif kind != "default":
        raise UserError(f"{model_type} rope_type {kind!r} is not supported by the GGUF export (default and linear are)")
    return out


def _decoder_common(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """What Llama and Qwen2 share: sizes, heads, RMSNorm eps, rope."""
    _require(config, "hidden_act", ("silu",), model_type)
    heads = config["num_attention_heads"]
    return {
        "block_count": config["num_hidden_layers"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": heads,
        "head_count_kv": config.get("num_key_value_heads") or heads,
        "layer_norm_rms_eps": float(config["rms_norm_eps"]),
        **_rope(config, model_type),
    }


def _llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    _require(config, "attention_bias", (False,), "llama")
    _require(config, "mlp_bias", (False,), "llama")
    _require(config, "pretraining_tp", (1,), "llama")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = {**_decoder_common(config, "llama"), "vocab_size": config["vocab_size"], "rope_dimension_count": head_dim}
    if config.get("head_dim"):  # as convert_hf_to_gguf: explicit head sizes when the config has them
        out.update(key_length=head_dim, value_length=head_dim)
    return out


def _qwen2_hparams(config: dict[str, Any]) -> dict[str, Any]:
    _require(config, "use_sliding_window", (False,), "qwen2")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim", head_dim) != head_dim:
        raise UserError(f"qwen2 head_dim={config['head_dim']} differs from hidden_size / num_attention_heads "
                        f"= {head_dim}; llama.cpp's qwen2 needs them equal")
    return _decoder_common(config, "qwen2")


def _gpt2_hparams(config: dict[str, Any]) -> dict[str, Any]:
    # ggml's gelu is the tanh approximation, which is GPT-2's gelu_new
    _require(config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gpt2")
    _require(config, "scale_attn_weights", (True,), "gpt2")
    _require(config, "scale_attn_by_inverse_layer_idx", (False,), "gpt2")
    _require(config, "add_cross_attention", (False,), "gpt2")
    width = config["n_embd"]
    return {
        "block_count": config["n_layer"],
        "context_length": config.get("n_positions") or config["n_ctx"],
        "embedding_length": width,
        "feed_forward_length": config.get("n_inner") or 4 * width,
        "head_count": config["n_head"],
        "layer_norm_eps": float(config["layer_norm_epsilon"]),
    }


_LLAMA_LIKE = (
    (r"model\.embed_tokens", "token_embd"),
    (r"model\.norm", "output_norm"),
    (r"lm_head", "output"),
    (r"model\.layers\.(\d+)\.input_layernorm", "blk.{}.attn_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", "blk.{}.attn_q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", "blk.{}.attn_k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", "blk.{}.attn_v"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", "blk.{}.attn_output"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm", "blk.{}.ffn_norm"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", "blk.{}.ffn_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", "blk.{}.ffn_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", "blk.{}.ffn_down"),
)


def _llama_rope_heads(config: dict[str, Any]) -> dict[str, int]:
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    layers = config["num_hidden_layers"]
    return {**{f"blk.{i}.attn_q": heads for i in range(layers)}, **{f"blk.{i}.attn_k": kv for i in range(layers)}}


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", _LLAMA_LIKE, (r".*rotary_emb\.inv_freq",), _llama_hparams, rope_heads=_llama_rope_heads),
    "qwen2": Arch("qwen2", _LLAMA_LIKE, (r".*rotary_emb\.inv_freq",), _qwen2_hparams),
    "gpt2": Arch(
        "gpt2",
        (
            (r"wte", "token_embd"),
            (r"wpe", "position_embd"),
            (r"ln_f", "output_norm"),
            (r"lm_head", "output"),
            (r"h\.(\d+)\.ln_1", "blk.{}.attn_norm"),
            (r"h\.(\d+)\.attn\.c_attn", "blk.{}.attn_qkv"),
            (r"h\.(\d+)\.attn\.c_proj", "blk.{}.attn_output"),
            (r"h\.(\d+)\.ln_2", "blk.{}.ffn_norm"),
            (r"h\.(\d+)\.mlp\.c_fc", "blk.{}.ffn_up"),
            (r"h\.(\d+)\.mlp\.c_proj", "blk.{}.ffn_down"),
        ),
        (r"h\.\d+\.attn\.(masked_)?bias",),
        _gpt2_hparams,
        conv1d=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
        prefix="transformer.",
        tied_default=True,
    ),
}


def arch_for(config: dict[str, Any], where: str) -> Arch:
    """The Arch of a config.json, or a UserError naming the architecture llama.cpp export lacks."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UserError(f"{where}: architecture {model_type!r} is not supported by the GGUF export "
                        f"(supported: {', '.join(ARCHS)})")
    if config.get("quantization_config") and config["quantization_config"].get("quant_method") != "bitsandbytes":
        raise UserError(f"{where}: quantization {config['quantization_config'].get('quant_method')!r} "
                        "cannot be read; export from the full-precision model")
    return ARCHS[model_type]


def is_conv1d(arch: Arch, gguf_module: str) -> bool:
    return gguf_module.rpartition(".")[2] in arch.conv1d


def kept_in_f32(gguf_tensor: str, ndim: int) -> bool:
    """Tensors llama.cpp wants in F32 whatever the file type (convert_hf_to_gguf's rule): vectors,
    norms, biases and position embeddings."""
    return ndim <= 1 or gguf_tensor.endswith("_norm.weight") or not gguf_tensor.endswith(".weight") or (
        gguf_tensor == "position_embd.weight")


def rows_fit_q8_0(shape: tuple[int, ...]) -> bool:
    """Q8_0 packs rows in blocks of 32 values; other rows stay F16, as llama.cpp's converter does."""
    return len(shape) >= 1 and shape[-1] % 32 == 0 and math.prod(shape) > 0
