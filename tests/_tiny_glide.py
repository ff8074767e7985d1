"""Shared by the GLIDE tests: a tiny GPT-2-style BPE vocabulary written in the test (the bytes, a
few merged words, <|endoftext|>) and the flags of a tiny GLIDE model."""
import gzip
import json
import pathlib

from diffjax.tokenizer import END, bytes_to_unicode

WORDS = ("red", "green", "blue", "square", "circle", "a", "corgi", "painting")

# glide-text2im create_model flags of a model small enough for a 2-core CPU.
TINY_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult="1,2", num_heads=1,
                  num_head_channels=-1, attention_resolutions="8", dropout=0.0, xf_width=32,
                  xf_layers=1, xf_heads=2, xf_final_ln=True, xf_padding=True,
                  use_scale_shift_norm=True, resblock_updown=True)


def write_vocab(folder, words=WORDS) -> pathlib.Path:
    """encoder.json.gz + vocab.bpe.gz in `folder`: every byte symbol plus the merges that BPE
    training (most frequent adjacent pair first) learns on `words`, each with and without GPT-2's
    leading-space symbol, until every word is one token. -> folder"""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    space = bytes_to_unicode()[ord(" ")]
    corpus = [list(w) for word in words for w in (word, space + word)]
    merges = []
    while any(len(w) > 1 for w in corpus):
        counts = {}
        for w in corpus:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(sorted(counts), key=lambda p: counts[p])
        merges.append(best)
        for i, w in enumerate(corpus):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            corpus[i] = out
    vocab = symbols + ["".join(m) for m in merges] + [END]
    with gzip.open(folder / "encoder.json.gz", "wt") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f)
    with gzip.open(folder / "vocab.bpe.gz", "wt") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder
