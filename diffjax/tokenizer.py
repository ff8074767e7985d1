"""GLIDE's byte-level BPE tokenizers, read from vocabulary files the user already has (no network).

Two vocabularies ship with openai/glide-text2im (`glide_text2im/tokenizer/`):

* `encoder.json.gz` + `vocab.bpe.gz`: GPT-2's BPE (Radford et al. 2019; glide_text2im.tokenizer.bpe),
  which the text2im models use: 50257 tokens, `end_token = n_vocab - 1` (`<|endoftext|>`) pads the
  caption and the mask marks the real tokens. -> `GPT2Tokenizer`.
* `bpe_simple_vocab_16e6.txt.gz`: CLIP's BPE with the `</w>` end-of-word marker
  (glide_text2im.tokenizer.simple_tokenizer), used by GLIDE's noised CLIP text encoder: 49408 tokens,
  captions framed by `<|startoftext|>` ... `<|endoftext|>` and padded with 0. -> `CLIPTokenizer`.

Both map UTF-8 bytes to printable characters (`bytes_to_unicode`), split the text with a regular
expression, then merge symbol pairs in the order of the merges file (lowest rank first).
`load_tokenizer(path)` picks the class from the file; `tokens_and_mask(tok, prompts, text_ctx)` gives
the arrays the models take and `empty_tokens_and_mask(tok, batch, text_ctx)` the unconditional
(empty-prompt) ones for classifier-free guidance.

The split patterns need the `regex` package (Unicode classes \\p{L}, \\p{N}). CLIP's cleaning needs
`ftfy` (pinned: ftfy 6.3.1 produced the golden ids; without `ftfy.fix_text` 36 of the 268 golden
strings tokenise differently, so there is no fallback).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import pathlib
from typing import Iterable, Sequence

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"

# GPT-2's split (glide_text2im.tokenizer.bpe; no IGNORECASE, GLIDE lower-cases the text first).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# CLIP's split (simple_tokenizer): no leading spaces, digits one by one, special tokens whole.
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                 r"""|[^\s\p{L}\p{N}]+""")
_CLIP_NUM_MERGES = 49152 - 256 - 2  # simple_tokenizer keeps merges[1 : 49152 - 256 - 2 + 1]


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to chr(256 + n) in byte order (so BPE never sees whitespace or control chars).
    The dict's order (printable bytes first, then the others) is the order of CLIP's first 256
    vocabulary entries."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _compile(pattern: str, ignorecase: bool):
    try:
        import regex
    except ImportError:  # pragma: no cover - regex is installed alongside diffjax's deps
        raise ImportError("diffjax.tokenizer needs the `regex` package for Unicode classes: "
                          "pip install regex") from None
    return regex.compile(pattern, regex.IGNORECASE if ignorecase else 0)


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        raise ImportError("CLIP's tokenizer cleans text with ftfy.fix_text, as glide-text2im does: "
                          "pip install ftfy==6.3.1 (the version the golden ids were made with)"
                          ) from None
    return ftfy.fix_text(text)


def _read_text(path) -> str:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist: point to glide-text2im's "
                                f"glide_text2im/tokenizer/ files")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        return f.read().decode("utf-8")


class _BytePairEncoder:
    """The BPE core shared by both vocabularies. `end_of_word` is appended to the last symbol of
    every word before merging ("" for GPT-2, "</w>" for CLIP)."""

    end_of_word = ""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], pattern):
        self.encoder = dict(encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = pattern
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-split, byte-mapped word, lowest-ranked pair first, every
        non-overlapping occurrence left to right, until no pair of the merges file remains."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + self.end_of_word]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = tuple(symbols)
        return self._cache[word]

    def _normalise(self, text: str) -> str:
        return text.lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no padding, no special tokens)."""
        ids = []
        for piece in self._pattern.findall(self._normalise(text)):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for symbol in self.bpe(word):
                if symbol not in self.encoder:
                    raise ValueError(f"the vocabulary has no entry for {symbol!r} (from {piece!r}): "
                                     f"the merges and vocabulary files do not belong together")
                ids.append(self.encoder[symbol])
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int):
        raise NotImplementedError

    def __call__(self, prompts, text_ctx: int = 128):
        return tokens_and_mask(self, prompts, text_ctx)


class GPT2Tokenizer(_BytePairEncoder):
    """glide_text2im.tokenizer.bpe.Encoder: GPT-2's BPE, the tokenizer of the text2im models.

    `GPT2Tokenizer.from_files(encoder_json, vocab_bpe)` (plain or .gz). Text is lower-cased (as
    GLIDE does); a word's leading space is part of it (byte 0x20 -> 'Ġ')."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
        super().__init__(encoder, merges, _compile(_GPT2_PATTERN, ignorecase=False))

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe) -> "GPT2Tokenizer":
        encoder = json.loads(_read_text(encoder_json))
        lines = _read_text(vocab_bpe).split("\n")[1:]  # the first line is '#version: 0.2'
        return cls(encoder, [tuple(line.split()) for line in lines if line.strip()])

    @property
    def end_token(self) -> int:
        """n_vocab - 1 (`<|endoftext|>` in GPT-2's vocabulary), the padding token."""
        return self.n_vocab - 1

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int):
        """glide-text2im's padded_tokens_and_mask: the first text_ctx tokens, then end_token
        padding; mask True for the real tokens. -> (list of text_ctx ints, list of text_ctx bools)"""
        _check_ctx(text_ctx)
        tokens = list(tokens)[:text_ctx]
        padding = text_ctx - len(tokens)
        return tokens + [self.end_token] * padding, [True] * len(tokens) + [False] * padding


class CLIPTokenizer(_BytePairEncoder):
    """glide_text2im.tokenizer.simple_tokenizer.SimpleTokenizer: CLIP's BPE with `</w>`.

    `CLIPTokenizer.from_file(bpe_simple_vocab)`: the vocabulary is the 256 byte characters, the same
    with `</w>`, one entry per merge (in order), then `<|startoftext|>`, `<|endoftext|>`."""

    end_of_word = "</w>"

    def __init__(self, merges: Sequence[tuple[str, str]]):
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
        super().__init__({v: i for i, v in enumerate(vocab)}, merges,
                         _compile(_CLIP_PATTERN, ignorecase=True))
        self._cache.update({START: (START,), END: (END,)})

    @classmethod
    def from_file(cls, bpe_simple_vocab) -> "CLIPTokenizer":
        lines = _read_text(bpe_simple_vocab).split("\n")[1:_CLIP_NUM_MERGES + 1]
        return cls([tuple(line.split()) for line in lines if line.strip()])

    @property
    def start_token(self) -> int:
        return self.encoder[START]

    @property
    def end_token(self) -> int:
        return self.encoder[END]

    def clean_text(self, text: str) -> str:
        """The text the split pattern sees: simple_tokenizer's whitespace_clean(basic_clean(text))
        .lower(): ftfy.fix_text, html.unescape twice, strip, whitespace runs -> ' ', lower-case."""
        text = html.unescape(html.unescape(_fix_text(text))).strip()
        # str.split() and re's \s (whitespace_clean's pattern) use the same Unicode whitespace test.
        return " ".join(text.split()).lower()

    _normalise = clean_text

    def bpe(self, word: str) -> tuple[str, ...]:
        if word in (START, END):
            return (word,)
        return super().bpe(word)

    def decode(self, tokens: Iterable[int]) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def padded_tokens_and_len(self, tokens: Sequence[int], text_ctx: int):
        """simple_tokenizer's padded_tokens_and_len: [start] + tokens[:text_ctx - 2] + [end], then 0
        padding. -> (list of text_ctx ints, length including start and end)"""
        _check_ctx(text_ctx, minimum=2)
        tokens = [self.start_token] + list(tokens)[:text_ctx - 2] + [self.end_token]
        return tokens + [0] * (text_ctx - len(tokens)), len(tokens)

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int):
        """padded_tokens_and_len with the length as a mask (True for start, tokens and end)."""
        padded, length = self.padded_tokens_and_len(tokens, text_ctx)
        return padded, [i < length for i in range(text_ctx)]


def _check_ctx(text_ctx, minimum: int = 1) -> None:
    if not isinstance(text_ctx, (int, np.integer)) or text_ctx < minimum:
        raise ValueError(f"text_ctx={text_ctx!r} must be an int >= {minimum} (128 for GLIDE)")


def tokens_and_mask(tokenizer, prompts, text_ctx: int = 128):
    """Encode, truncate and pad a prompt or a list of prompts.

    -> (tokens [B, text_ctx] int32, mask [B, text_ctx] bool), the model's `tokens` / `mask`
    (B = 1 for a single string)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [tokenizer.padded_tokens_and_mask(tokenizer.encode(p), text_ctx) for p in prompts]
    if not rows:
        raise ValueError("tokens_and_mask got no prompts")
    tokens, mask = zip(*rows)
    return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def empty_tokens_and_mask(tokenizer, batch_size: int = 1, text_ctx: int = 128):
    """The unconditional (empty prompt) input of classifier-free guidance: padding only, mask all
    False for GPT-2 (glide-text2im's padded_tokens_and_mask([], text_ctx)).
    -> (tokens [batch_size, text_ctx] int32, mask [batch_size, text_ctx] bool)"""
    tokens, mask = tokenizer.padded_tokens_and_mask([], text_ctx)
    return (np.tile(np.asarray(tokens, np.int32), (batch_size, 1)),
            np.tile(np.asarray(mask, bool), (batch_size, 1)))


def glide_tokenizer_dir() -> pathlib.Path:
    """glide_text2im/tokenizer/ of an installed glide-text2im (found without importing it, so
    without torch). Raises FileNotFoundError with the fix when it is not installed."""
    spec = importlib.util.find_spec("glide_text2im")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("glide-text2im is not installed: pass the tokenizer files' path "
                                "(glide_text2im/tokenizer/ of a glide-text2im checkout)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def load_tokenizer(path=None):
    """A tokenizer from glide-text2im's files.

    path: a directory holding encoder.json(.gz) and vocab.bpe(.gz) -> GPT2Tokenizer (the text2im
    models'); either of those two files -> GPT2Tokenizer from the pair beside it; a
    bpe_simple_vocab*.txt(.gz) file -> CLIPTokenizer. None: the installed glide-text2im's GPT-2 files.
    """
    path = pathlib.Path(path) if path is not None else glide_tokenizer_dir()
    if path.is_file() and path.name.startswith("bpe_simple_vocab"):
        return CLIPTokenizer.from_file(path)
    folder = path if path.is_dir() else path.parent

    def find(stem):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(f"no {stem} or {stem}.gz in {folder}: GLIDE's text2im tokenizer "
                                f"needs encoder.json(.gz) and vocab.bpe(.gz) together (or pass a "
                                f"bpe_simple_vocab*.txt.gz file for CLIP's)")

    return GPT2Tokenizer.from_files(find("encoder.json"), find("vocab.bpe"))


@functools.lru_cache(maxsize=8)
def load(spec: str):
    """The caption tokenizer of `spec` (cached):

    * a folder holding glide-text2im's encoder.json(.gz) and vocab.bpe(.gz), or either file: GPT-2's
      BPE, the tokenizer of the released GLIDE models (n_vocab 50257; find the files in the
      glide-text2im package, glide_text2im/tokenizer/);
    * "bytes": byte-level, no merges: the 256 byte symbols plus <|endoftext|> (n_vocab 257), for
      small models trained from scratch with no vocabulary file.
    """
    if spec == "bytes":
        symbols = list(bytes_to_unicode().values())
        encoder = {c: i for i, c in enumerate(symbols)}
        encoder[END] = len(symbols)
        return GPT2Tokenizer(encoder, [])
    path = pathlib.Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {spec!r} does not exist: pass the folder glide_text2im/tokenizer/ of the "
            f"glide-text2im package (it holds encoder.json.gz and vocab.bpe.gz, GLIDE's GPT-2 "
            f"BPE; bpe_simple_vocab_16e6.txt.gz beside them is CLIP's), e.g. "
            f"$(python -c 'import glide_text2im, os; print(os.path.dirname(glide_text2im.__file__))')"
            f"/tokenizer, or 'bytes' for a byte-level model trained with diffjax")
    return load_tokenizer(path)


def check_vocabulary(tokenizer, n_vocab: int | None, model: str = "the model") -> None:
    """The tokenizer's vocabulary must be the model's (token ids index its embedding)."""
    if n_vocab is not None and tokenizer.n_vocab != n_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but {model} was built "
            f"for n_vocab={n_vocab}: the released GLIDE models need GPT-2's BPE (glide_text2im/"
            f"tokenizer/ with encoder.json.gz and vocab.bpe.gz; bpe_simple_vocab_16e6.txt.gz is "
            f"CLIP's, 49408 tokens); a model trained with diffjax needs its training tokenizer")



__all__ = ["load", "check_vocabulary", "GPT2Tokenizer", "CLIPTokenizer", "bytes_to_unicode", "tokens_and_mask",
           "empty_tokens_and_mask", "load_tokenizer", "glide_tokenizer_dir"]
