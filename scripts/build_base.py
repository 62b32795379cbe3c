"""Build lorakit's embedded base model and its demo corpora, end to end.

    .venv/bin/python scripts/build_base.py            # everything, with the shipped defaults
    .venv/bin/python scripts/build_base.py --steps 20 --out /tmp/base-try   # a quick trial

Steps: install the Debian packages that hold the texts (needs root and apt), extract and
clean them, write the corpora and splits, train a byte-level BPE tokenizer on the general
training text, pretrain a small Llama on it, save a transformers model directory (weights
in bfloat16 safetensors), reload it in a fresh model and report held-out perplexities and
sample generations. Seeded; device is CUDA when present, else CPU. Intermediate files
(tokenizer cache, token stream, training checkpoint) live in --work-dir, so a run that is
stopped picks up from its last checkpoint when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import base_corpus as corpus  # noqa: E402
import base_train as bt  # noqa: E402
from base_provenance import write_provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The ", "In the beginning", "A computer program", "The function returns", "To install"]
DOMAINS = ["kjv", "jargon", "devil"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "src/lorakit/assets",
                   help="assets folder: base/ and corpora/ are written here")
    p.add_argument("--work-dir", type=Path, default=REPO / "scratch/base-build",
                   help="intermediate files and the resumable training checkpoint")
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first (no resume)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (on the shared 2-core build machine 1 was faster than 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def build_corpora(out: Path, seed: int) -> dict:
    """Extract every text, write the shipped corpora, return the general training pages."""
    corpus.ensure_debian_packages()
    log("extracting Python and Django documentation")
    pages = ([("python3.11-doc", rel, text) for rel, text in corpus.sphinx_documents(corpus.PYTHON_DOCS)]
             + [("python-django-doc", rel, text) for rel, text in corpus.sphinx_documents(corpus.DJANGO_DOCS)])

    # General held-out: whole pages (at most 30 KB each) drawn by a seeded shuffle until
    # about 150 KB; none of their text is pretrained on.
    order = list(range(len(pages)))
    random.Random(seed).shuffle(order)
    heldout_ids, size = set(), 0
    for i in order:
        if size >= 150_000:
            break
        if len(pages[i][2]) <= 30_000:
            heldout_ids.add(i)
            size += len(pages[i][2])
    general_heldout = [pages[i] for i in sorted(heldout_ids)]
    general_train = [p for i, p in enumerate(pages) if i not in heldout_ids]
    write_text(out / "corpora/general/heldout.txt", "\n\n".join(t for _, _, t in general_heldout) + "\n")

    log("extracting the domain corpora")
    units = {"kjv": (corpus.kjv_chapters(), 20_000), "jargon": (corpus.jargon_entries(), 10_000),
             "devil": (corpus.devil_entries(), 5_000)}
    domain_sizes = {}
    for name, (items, chunk_chars) in units.items():
        train, heldout = corpus.chunked_split(items, chunk_chars=chunk_chars, heldout_every=10)
        write_text(out / f"corpora/{name}/train.txt", train)
        write_text(out / f"corpora/{name}/heldout.txt", heldout)
        domain_sizes[name] = (len(train.encode()), len(heldout.encode()))
    return {"general_train": general_train, "general_heldout": general_heldout,
            "domain_sizes": domain_sizes}


def patch_json(path: Path, drop: tuple[str, ...] = (), **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    for key in drop:
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2) + "\n")


def ngram_overlap(text: str, reference: set, n: int = 13) -> float:
    """Share of the word n-grams of `text` that occur in `reference` (a leak check)."""
    words = text.split()
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return sum(g in reference for g in grams) / max(1, len(grams))


def word_ngrams(texts, n: int = 13) -> set:
    grams = set()
    for t in texts:
        w = t.split()
        grams.update(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))
    return grams


def load_or_train_tokenizer(work: Path, texts: list[str], vocab_size: int, max_len: int):
    cached = work / "tokenizer"
    if cached.exists():
        log(f"reusing tokenizer from {cached}")
        return PreTrainedTokenizerFast.from_pretrained(cached)
    log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the general training text")
    tokenizer = bt.train_tokenizer(texts, vocab_size=vocab_size, max_length=max_len)
    tokenizer.save_pretrained(cached)
    return tokenizer


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.fresh and args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    base_dir = args.out / "base"
    log(f"device {device}, torch threads {torch.get_num_threads()}, work dir {args.work_dir}")

    # 1. Text.
    built = build_corpora(args.out, args.seed)
    train_docs = [t for _, _, t in built["general_train"]]
    log(f"general: {len(train_docs)} training pages ({sum(map(len, train_docs)) / 1e6:.2f} MB), "
        f"{len(built['general_heldout'])} held-out pages")
    train_grams = word_ngrams(train_docs)
    overlaps = {name: ngram_overlap((args.out / f"corpora/{name}/heldout.txt").read_text(), train_grams)
                for name in ["general", *DOMAINS]}
    log("13-gram overlap of each held-out file with the pretraining text: "
        + ", ".join(f"{k} {v:.4f}" for k, v in overlaps.items()))

    # 2. Tokenizer.
    shape = bt.Shape()
    tokenizer = load_or_train_tokenizer(args.work_dir, train_docs, shape.vocab_size,
                                        shape.max_position_embeddings)
    checks = [d[:2000] for d in train_docs[:20]] + [
        (args.out / f"corpora/{n}/heldout.txt").read_text()[:3000] for n in DOMAINS]
    bt.check_round_trip(tokenizer, checks + ["Hello, world!\n\n  Tabs\tand  spaces.\n", "naïve café — “quotes”"])
    log("tokenizer round-trips its checks exactly")
    stream_path = args.work_dir / "train_tokens.npy"
    if stream_path.exists():
        stream = np.load(stream_path)
    else:
        stream = bt.encode_documents(tokenizer, train_docs)
        np.save(stream_path, stream)
    log(f"pretraining stream: {len(stream) / 1e6:.2f}M tokens "
        f"({sum(map(len, train_docs)) / len(stream):.2f} characters a token)")

    # 3. Pretraining.
    model = bt.make_model(shape, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {asdict(shape)}, {n_params / 1e6:.2f}M parameters (tied embeddings)")
    cfg = bt.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, warmup=args.warmup, seed=args.seed)
    log(f"pretraining: {asdict(cfg)}; {cfg.steps * cfg.batch_size * cfg.seq_len / 1e6:.2f}M tokens, "
        f"{cfg.steps * cfg.batch_size * cfg.seq_len / len(stream):.2f} epochs")
    stats = bt.pretrain(model, stream, cfg, device, args.work_dir / "checkpoint.pt", log)

    # 4. Save: bfloat16 safetensors keeps the package small.
    if base_dir.exists():
        shutil.rmtree(base_dir)
    model.to("cpu", dtype=torch.bfloat16).save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8,
                     top_k=50, max_new_tokens=64).save_pretrained(base_dir)
    # The weights are stored in bf16 but the model was trained, and should run, in float32:
    # transformers 5 loads in config.dtype by default, and bf16 matmuls are ~40x slower on
    # CPUs without AMX / AVX-512 BF16. The generic tokenizer class name also loads in 4.x.
    patch_json(base_dir / "config.json", dtype="float32")
    # (A tokenizer reloaded from the work dir cache also records where it was loaded from.)
    patch_json(base_dir / "tokenizer_config.json", drop=("is_local", "local_files_only"),
               tokenizer_class="PreTrainedTokenizerFast")
    size = sum(f.stat().st_size for f in base_dir.iterdir())
    log(f"saved {base_dir} ({size / 1e6:.1f} MB)")

    # 5. Reload from disk, as a user would, and evaluate.
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ppl = {name: bt.perplexity(model, tokenizer, (args.out / f"corpora/{name}/heldout.txt").read_text(),
                               args.seq_len, device) for name in ["general", *DOMAINS]}
    log("held-out perplexity: " + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items()))
    samples = {p: bt.sample(model, tokenizer, p, 60, args.seed, device) for p in PROMPTS}
    for prompt, text in samples.items():
        print(f"\n--- {prompt!r}\n{text}", flush=True)

    report = {"device": str(device), "parameters": n_params, "shape": asdict(shape), "train": asdict(cfg),
              "tokens_seen": stats["tokens"], "train_seconds": round(stats["seconds"]),
              "stream_tokens": int(len(stream)), "disk_bytes": size, "perplexity": ppl,
              "heldout_13gram_overlap": overlaps, "samples": samples}
    (args.work_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_provenance(args.out, built, report)
    log(f"wrote {args.out / 'PROVENANCE.md'} and {args.work_dir / 'report.json'}")


if __name__ == "__main__":
    main()
