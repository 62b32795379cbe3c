"""What each `lorakit gguf --type` costs on the embedded base: file size and logit error in llama.cpp.

    .venv/bin/python benchmarks/gguf_types.py

The reference is lorakit's own fp32 model on the same token ids (the embedded base's held-out text,
cut into windows). For each type: the file's size, llama.cpp's logits against the reference (largest
|Δ| over the largest |logit|, and the mean |Δ|), how often the top-1 token agrees, and the perplexity
of the held-out text under each. llama.cpp runs with an f32 KV cache, so the f32 row is the floor.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lorakit.base import CORPORA, load_base  # noqa: E402
from lorakit.cli import main as lorakit_main  # noqa: E402

WINDOW, WINDOWS = 128, 8


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token loss of `ids[1:]` under `logits[:-1]` (float64)."""
    z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return math.exp(-float(np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))


def main() -> None:
    from llama_cpp import Llama
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the held-out text is tokenized whole, then cut into windows
    model, tok = load_base(None, dtype=torch.float32, device=torch.device("cpu"))
    text = (CORPORA / "general" / "heldout.txt").read_text()
    ids = tok(text)["input_ids"]
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    with torch.no_grad():
        ours = [model(torch.tensor([w])).logits[0].double().numpy() for w in windows]
    print(f"embedded base, {WINDOWS} windows of {WINDOW} tokens of general/heldout.txt; lorakit fp32 perplexity "
          f"{np.mean([perplexity(o, w) for o, w in zip(ours, windows)]):.3f}")
    print(f"{'type':6} {'size MB':>8} {'max|Δ|/max|z|':>14} {'mean|Δ|':>9} {'top-1 same':>10} {'perplexity':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for type_name in ("f32", "f16", "bf16", "q8_0"):
            out = Path(tmp) / f"{type_name}.gguf"
            assert lorakit_main(["gguf", "--out", str(out), "--type", type_name]) == 0
            llm = Llama(model_path=str(out), logits_all=True, n_ctx=WINDOW, n_threads=2, type_k=0, type_v=0,
                        verbose=False)
            worst = mean = same = ppl = 0.0
            for w, o in zip(windows, ours):
                llm.reset()
                llm.eval(w)
                theirs = np.array(llm.scores[: len(w)], dtype=np.float64)
                worst = max(worst, float(np.abs(theirs - o).max() / np.abs(o).max()))
                mean += float(np.abs(theirs - o).mean()) / WINDOWS
                same += float((theirs.argmax(1) == o.argmax(1)).mean()) / WINDOWS
                ppl += perplexity(theirs, w) / WINDOWS
            print(f"{type_name:6} {out.stat().st_size / 1e6:8.2f} {worst:14.2e} {mean:9.2e} {100 * same:9.1f}% "
                  f"{ppl:10.3f}")


if __name__ == "__main__":
    main()
