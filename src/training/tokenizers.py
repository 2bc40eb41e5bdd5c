"""Whether two tokenizers are the same: then the teacher reuses the student's token ids."""

from __future__ import annotations

import torch

# Captions that tell tokenizers apart: case, accents, digits, punctuation, and a length past every context.
TOKENIZER_PROBES = ["A photo of a Café, number 42!", "THE quick brown fox — jumps over the lazy dog?",
                    "naïve façade 東京 emoji 🙂 tab\there", " ".join(f"word{i}" for i in range(300))]


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers give the same ids for every probe caption (their classes say nothing: SigLIP's T5
    and SigLIP 2's Gemma tokenizers are both HFTokenizer with context 64, with different vocabularies)."""
    if a is b:
        return True
    try:
        ta, tb = a(TOKENIZER_PROBES), b(TOKENIZER_PROBES)
    except Exception:  # a tokenizer that cannot take the probes cannot be shown to be the same
        return False
    return ta.shape == tb.shape and bool(torch.equal(ta, tb))
