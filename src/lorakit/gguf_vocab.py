"""A byte-level BPE tokenizer as llama.cpp's GGUF metadata, so that llama.cpp tokenizes as transformers does.

llama.cpp re-implements tokenizers rather than reading tokenizer.json: a GGUF file carries the vocabulary
(`tokenizer.ggml.tokens`, in the byte-level alphabet, e.g. 'Ġthe'), a type per token, the merges in
rank order, the special token ids and the *name* of a pre-tokenizer (`tokenizer.ggml.pre`) whose regex
llama.cpp has built in (src/llama-vocab.cpp). So the pre-tokenizer is recognised here by its structure
and exact regex; one llama.cpp does not name is refused, never written as a lookalike. Tests tokenize
sentences with both and compare the ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import UserError

# The Split regexes of Llama 3's and Qwen2's tokenizer.json, as llama.cpp quotes them in llama-vocab.cpp.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Split regex -> (llama.cpp pre-tokenizer name, the ignore_merges llama.cpp assumes for it)
_SPLIT_PRE = {_LLAMA3_REGEX: ("llama-bpe", True), _QWEN2_REGEX: ("qwen2", False)}

# gguf's TokenType values (written as plain ints so this module needs no gguf import)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    """What `tokenizer.ggml.*` holds."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]
    """bos / eos / unk / pad -> token id, for those the tokenizer has."""
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(directory: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer saved in `directory`, padded to the model's `vocab_size`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise UserError(f"{directory}: no tokenizer transformers can load ({str(err).splitlines()[0]}); "
                        "a GGUF base needs one for llama.cpp to tokenize") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{directory}: the tokenizer has no tokenizer.json (a 'fast' tokenizer); the GGUF "
                        "export reads its BPE model from there")
    spec = json.loads(tok.backend_tokenizer.to_str())
    pre = _pre_tokenizer(spec, directory)

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"{directory}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows of the embedding no token uses (vocabularies padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)

    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special = {kind: getattr(tok, f"{kind}_token_id") for kind in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    # What transformers adds around a text, observed rather than read from the post-processor's config
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    added_any = len(full) > len(plain)
    add_bos = added_any and full[0] == special.get("bos")
    add_eos = added_any and full[-1] == special.get("eos")
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return Vocab(pre, tokens, types, merges, special, add_bos, add_eos, template)


def _pre_tokenizer(spec: dict[str, Any], directory: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a UserError saying which one it is."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{directory}: tokenizer model {model.get('type')!r}"
                        f"{' with byte_fallback' if model.get('byte_fallback') else ''} is not supported by the "
                        "GGUF export (byte-level BPE is)")
    normalizer = spec.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise UserError(f"{directory}: tokenizer normalizer {normalizer.get('type')!r} is not supported by the "
                        "GGUF export (llama.cpp's BPE does not normalize)")
    steps = spec.get("pre_tokenizer")
    steps = steps.get("pretokenizers", []) if steps and steps.get("type") == "Sequence" else [steps]
    ignore_merges = bool(model.get("ignore_merges", False))
    if len(steps) == 1 and _is_byte_level(steps[0], regex=True) and not ignore_merges:
        return "gpt-2"  # GPT-2's own regex, inside ByteLevel
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], regex=False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRE and split.get("behavior") == "Isolated" and not split.get("invert"):
            name, wants_ignore = _SPLIT_PRE[regex]
            if ignore_merges == wants_ignore:
                return name
    described = json.dumps(spec.get("pre_tokenizer"))[:200]
    raise UserError(f"{directory}: its pre-tokenizer is not one llama.cpp names (GPT-2's, Llama 3's or "
                    f"Qwen2's byte-level BPE), so llama.cpp would split text differently: {described}")


def _is_byte_level(step: dict[str, Any] | None, regex: bool) -> bool:
    return bool(step) and step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex and not (
        step.get("add_prefix_space"))
