"""`lorakit gguf`, checked by its real consumer: llama.cpp (through llama-cpp-python) loads the files and
must give the logits, greedy continuations and token ids that lorakit and transformers give.

Tolerances, on max |Δlogit| / max |logit| over every position of a prompt: f32 files 1e-5 (measured
3e-7 to 7e-7: llama.cpp's float order; GPT-2 2e-3, measured up to 5.3e-4, because llama.cpp's CPU GELU
rounds to an f16 table: a reference with that rounding matches to 1.1e-5); f16 / bf16 / q8_0 files 2e-3 / 1.5e-2 / 4e-2, about 3x the largest error measured on
these tiny random models (6e-4 / 4.5e-3 / 1.3e-2): the weights' rounding. The embedded base's numbers
per type are in docs/gguf.md.
"""

from __future__ import annotations

import json

import gguf
import llama_cpp  # a dev dependency (make setup builds it): the point of these tests is llama.cpp's verdict
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import TOKENIZER_TEXT, make_tiny_base, randomize_adapters

import lorakit
from lorakit.base import EMBEDDED_BASE, load_base
from lorakit.cli import main
from lorakit.io import attach_adapters

CPU = torch.device("cpu")
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 4e-2}
GELU_TABLE = 2e-3  # GPT-2's f32 tolerance
SENTENCES = [
    "The ship sailed at dawn.",
    "  Two spaces, then\nnew lines\n\n and tabs\t here!",
    "I've been told he's there; 'RE you sure? We'Ve 3 33 333 3333 ideas.",
    "Naïve café — ünïcödé and emoji 🚀 too",
]
PROMPTS = ["The captain saw", "In the beginning", "A computer program"]


# -- tiny bases of each architecture, each with its own byte-level BPE tokenizer ------------------------

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _tokenizer(directory, style: str, bos: bool):
    """A BPE tokenizer trained on the shared text: GPT-2's pre-tokenizer, or Qwen2's / Llama 3's Split."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
        tok.normalizer = normalizers.NFC() if style == "qwen2" else None
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def _qwen2(directory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(directory, "qwen2", bos=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).save_pretrained(directory)


def _gpt2(directory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(directory, "gpt2", bos=False)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(directory)


def _llama(directory):
    make_tiny_base(directory, hidden=64)
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"]  # the tied case: like the embedded base


def _llama_untied(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(directory, "llama3", bos=True)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).save_pretrained(directory)


BUILDERS = {"llama": _llama, "llama_untied": _llama_untied, "qwen2": _qwen2, "gpt2": _gpt2}
# the adapter targets per base: every Linear, plus the embedding and head where llama.cpp can adapt them
TARGETS = {"llama": "all-linear", "llama_untied": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj", "embed_tokens", "lm_head"],
           "qwen2": "all-linear", "gpt2": "all-linear", "embedded": ["q_proj", "k_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {"embedded": EMBEDDED_BASE}
    for name, build in BUILDERS.items():
        out[name] = tmp_path_factory.mktemp(name)
        build(out[name])
    return out


def _adapter(base, directory, targets, seed=0, **kw):
    model, _ = load_base(str(base), dtype=torch.float32, device=CPU)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                             base_model_name_or_path=str(base), **kw))
    randomize_adapters(model, seed=seed, scale=0.2)
    lorakit.save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {name: _adapter(base, d / name, TARGETS[name]) for name, base in bases.items()}


# -- running both sides -------------------------------------------------------------------------------


def gguf_cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["gguf", *map(str, argv)])
    return code, err.getvalue()


def load_llama(path, lora=None, scale: float = 1.0):
    """llama.cpp on the file, every position's logits kept, KV cache in f32 so f32 files compare tightly.

    One thread: llama.cpp's OpenMP threads spin after each call, and on a busy machine they starve torch's
    (and torch's theirs) when the two alternate in one process."""
    return llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), lora_scale=scale,
                           logits_all=True, n_ctx=128, n_threads=1, n_threads_batch=1, type_k=0, type_v=0,
                           verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def lorakit_model(base, adapters: list[str] = ()):
    model, tok = load_base(str(base), dtype=torch.float32, device=CPU)
    if adapters:
        attach_adapters(model, list(adapters))
    return model, tok


def lorakit_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def f32_tolerance(family: str) -> float:
    return GELU_TABLE if family == "gpt2" else TOLERANCE["f32"]


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def greedy_lorakit(model, ids: list[int], n: int) -> list[int]:
    out, step, past = [], torch.tensor([ids]), None
    with torch.no_grad():
        for _ in range(n):
            result = model(step, cache=past, use_cache=True)
            out.append(int(result.logits[0, -1].argmax()))
            step, past = torch.tensor([[out[-1]]]), result.cache
    return out


def prompt_ids(tok, text: str = "The captain saw the red sky and said") -> list[int]:
    return tok(text)["input_ids"]


# -- the base --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["embedded", "llama", "llama_untied", "qwen2", "gpt2"])
def test_tokenization_equals_transformers(bases, tmp_path, family):
    out = tmp_path / "base.gguf"
    assert gguf_cli("--base", bases[family], "--out", out)[0] == 0
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    _, tok = lorakit_model(bases[family])
    for text in SENTENCES:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text


@pytest.mark.parametrize("family", ["embedded", "llama", "llama_untied", "qwen2", "gpt2"])
@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16", "q8_0"])
def test_base_logits_match(bases, tmp_path, family, type_name):
    out = tmp_path / "base.gguf"
    assert gguf_cli("--base", bases[family], "--out", out, "--type", type_name)[0] == 0
    model, tok = lorakit_model(bases[family])
    ids = prompt_ids(tok)
    error = relative_error(lorakit_logits(model, ids), llama_logits(load_llama(out), ids))
    assert error < max(TOLERANCE[type_name], GELU_TABLE if family == "gpt2" else 0), error


# -- adapters ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_files(bases, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, base in bases.items():
        out[family] = d / f"{family}.gguf"
        assert gguf_cli("--base", base, "--out", out[family], "--type", "f32")[0] == 0
    return out


@pytest.mark.parametrize("family", ["embedded", "llama", "llama_untied", "qwen2", "gpt2"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_adapter_logits_match(bases, adapters, base_files, tmp_path, family, scale):
    lora = tmp_path / "adapter.gguf"
    assert gguf_cli("--adapter", adapters[family], "--out", lora)[0] == 0
    model, tok = lorakit_model(bases[family], [f"{adapters[family]}:{scale}"])
    base_model, _ = lorakit_model(bases[family])
    ids = prompt_ids(tok)
    ours = lorakit_logits(model, ids)
    assert relative_error(ours, lorakit_logits(base_model, ids)) > 10 * f32_tolerance(family)  # the adapter matters
    error = relative_error(ours, llama_logits(load_llama(base_files[family], lora, scale), ids))
    assert error < f32_tolerance(family), error


@pytest.mark.parametrize("family", ["embedded", "llama", "llama_untied", "qwen2", "gpt2"])
def test_merged_logits_match(bases, adapters, tmp_path, family):
    out = tmp_path / "merged.gguf"
    specs = [f"{adapters[family]}:0.7"]
    assert gguf_cli("--base", bases[family], "--adapter", specs[0], "--out", out, "--type", "f32")[0] == 0
    model, tok = lorakit_model(bases[family], specs)
    ids = prompt_ids(tok)
    error = relative_error(lorakit_logits(model, ids), llama_logits(load_llama(out), ids))
    assert error < f32_tolerance(family), error


def test_greedy_continuations_match_on_the_embedded_base(bases, adapters, base_files, tmp_path):
    lora = tmp_path / "adapter.gguf"
    assert gguf_cli("--adapter", adapters["embedded"], "--out", lora)[0] == 0
    model, tok = lorakit_model(bases["embedded"], [str(adapters["embedded"])])
    plain, _ = lorakit_model(bases["embedded"])
    prompts = [tok(prompt)["input_ids"] for prompt in PROMPTS]
    ours = [(greedy_lorakit(model, ids, 12), greedy_lorakit(plain, ids, 12)) for ids in prompts]
    adapted, base = load_llama(base_files["embedded"], lora), load_llama(base_files["embedded"])
    theirs = [(greedy_llama(adapted, ids, 12), greedy_llama(base, ids, 12)) for ids in prompts]
    assert theirs == ours
    assert all(a != b for a, b in ours)  # the adapter changes every continuation


def test_scales_patterns_and_rslora_reach_llama_cpp_exactly(bases, base_files, tmp_path):
    """llama.cpp has one alpha per file and takes r from each B: per-module scales fold into B."""
    base = bases["llama_untied"]
    adapter = _adapter(base, tmp_path / "a", ["q_proj", "k_proj", "v_proj", "down_proj"], seed=5, use_rslora=True,
                       rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})
    lora = tmp_path / "a.gguf"
    assert gguf_cli("--adapter", f"{adapter}:0.25", "--out", lora)[0] == 0  # a scale baked into the file
    model, tok = lorakit_model(base, [f"{adapter}:0.25"])
    ids = prompt_ids(tok)
    error = relative_error(lorakit_logits(model, ids), llama_logits(load_llama(base_files["llama_untied"], lora), ids))
    assert error < TOLERANCE["f32"], error


def test_two_adapters_merge_into_one_file(bases, adapters, tmp_path):
    base = bases["qwen2"]
    other = _adapter(base, tmp_path / "b", ["q_proj", "o_proj"], seed=9)
    specs = [f"{adapters['qwen2']}:0.5", f"{other}:-1.5"]
    out = tmp_path / "merged.gguf"
    assert gguf_cli("--base", base, *[a for s in specs for a in ("--adapter", s)], "--out", out)[0] == 0
    model, tok = lorakit_model(base, specs)
    ids = prompt_ids(tok)
    assert relative_error(lorakit_logits(model, ids), llama_logits(load_llama(out), ids)) < TOLERANCE["f32"]


def test_adapter_file_metadata_and_layout(adapters, tmp_path):
    lora = tmp_path / "a.gguf"
    assert gguf_cli("--adapter", adapters["embedded"], "--out", lora)[0] == 0
    reader = gguf.GGUFReader(lora)
    fields = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha",
                                                       "general.architecture")}
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0,
                      "general.architecture": "llama"}
    tensors = {t.name: t for t in reader.tensors}
    config, stored = lorakit.read_adapter(adapters["embedded"])
    A = stored["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    B = stored["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    # ggml's ne is PyTorch's shape reversed; v is not rope-permuted, so the bytes are PEFT's own
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_a"].data, A.numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, B.numpy())
    assert list(tensors["blk.0.attn_q.weight.lora_b"].shape) == [4, 256]  # ne = {r, out}


def test_q8_0_blocks_are_the_explicit_maths(bases, tmp_path):
    """Q8_0 (ggml's reference quantizer): per 32 values d = max|x| / 127 in f32, q = round(x · (1/d)) half away
    from zero in f32, and d stored as f16."""
    out = tmp_path / "q.gguf"
    assert gguf_cli("--base", bases["qwen2"], "--out", out, "--type", "q8_0")[0] == 0

    w = load_file(str(bases["qwen2"] / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].numpy()
    blocks = w.reshape(-1, 32)  # float32, as ggml computes
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    scaled = blocks * (np.float32(1) / d)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    expected = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1).reshape(w.shape[0], -1)
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.1.ffn_up.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)


def test_nf4_base_needs_a_type_then_matches_its_dequantized_weights(bases, tmp_path):
    nf4_dir = tmp_path / "nf4"
    assert main(["quantize", "--base", str(bases["llama_untied"]), "--out", str(nf4_dir)]) == 0
    code, err = gguf_cli("--base", nf4_dir, "--out", tmp_path / "x.gguf")
    assert code == 2 and "NF4" in err and "--type" in err and not (tmp_path / "x.gguf").exists()
    out = tmp_path / "nf4.gguf"
    assert gguf_cli("--base", nf4_dir, "--out", out, "--type", "f32")[0] == 0
    model, tok = lorakit_model(nf4_dir)  # lorakit's NF4 model computes with the same dequantized weights
    ids = prompt_ids(tok)
    assert relative_error(lorakit_logits(model, ids), llama_logits(load_llama(out), ids)) < TOLERANCE["f32"]


# -- hostile input: one line, exit 2, nothing written ------------------------------------------------------


def _dora(adapter, tmp_path):
    d = tmp_path / "dora"
    d.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key, B in list(tensors.items()):  # a complete DoRA adapter: each module's magnitude, (out,)
        if key.endswith(".lora_B.weight"):
            tensors[key[: -len(".lora_B.weight")] + ".lora_magnitude_vector"] = torch.ones(B.shape[0], dtype=B.dtype)
    save_file(tensors, d / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return d


def _unsupported_arch(bases, tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return d


def _truncated(bases, tmp_path):
    d = tmp_path / "truncated"
    d.mkdir()
    for f in bases["gpt2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _odd_tokenizer(bases, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "whitespace"
    d.mkdir()
    for f in bases["llama"].iterdir():
        if f.name.startswith(("config", "model")):
            (d / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TOKENIZER_TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"],
                                                                  show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(d)
    return d


def _with(tmp_path, adapter, **changes):
    d = tmp_path / "changed"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return d


HOSTILE = {
    "unsupported architecture": (lambda b, a, t: ["--base", _unsupported_arch(b, t)], "'bert' is not supported"),
    "DoRA adapter": (lambda b, a, t: ["--adapter", _dora(a["llama"], t)], "is a DoRA adapter"),
    "modules_to_save": (lambda b, a, t: ["--adapter", _with(t, a["llama"], modules_to_save=["lm_head"])],
                        "modules_to_save"),
    "adapter on a tied embedding": (
        lambda b, a, t: ["--adapter", _adapter(b["llama"], t / "emb", ["embed_tokens", "q_proj"])], "ties"),
    "adapter for another base": (
        lambda b, a, t: ["--adapter", a["qwen2"], "--adapter-base", b["llama_untied"]], "another model"),
    "unknown type": (lambda b, a, t: ["--base", b["llama"], "--type", "q4_k"], "--type 'q4_k'"),
    "truncated weights": (lambda b, a, t: ["--base", _truncated(b, t)], "not a valid safetensors"),
    "pre-tokenizer llama.cpp does not name": (lambda b, a, t: ["--base", _odd_tokenizer(b, t)], "pre-tokenizer"),
    "several adapters into one adapter file": (lambda b, a, t: ["--adapter", a["llama"], "--adapter", a["llama"]],
                                               "one adapter"),
    "missing base": (lambda b, a, t: ["--base", t / "nowhere"], "config.json"),
    "NaN scale": (lambda b, a, t: ["--base", b["llama"], "--adapter", f"{a['llama']}:nan"], "finite"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_input_ends_in_one_line_and_leaves_nothing(bases, adapters, tmp_path, case):
    make_args, expected = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(bases, adapters, work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = gguf_cli(*args, "--out", out_dir / "x.gguf")
    assert code == 2, err
    assert err.count("\n") == 1 and expected in err, err
    assert list(out_dir.iterdir()) == []


def test_existing_file_needs_overwrite_and_survives_a_failure(bases, adapters, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    code, err = gguf_cli("--base", bases["llama"], "--out", out)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"old"
    code, err = gguf_cli("--base", bases["llama"], "--out", out, "--overwrite", "--adapter", adapters["qwen2"])
    assert code == 2 and out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
    assert gguf_cli("--base", bases["llama"], "--out", out, "--overwrite")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"
