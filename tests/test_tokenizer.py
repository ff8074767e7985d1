"""GLIDE's BPE tokenizers on tiny vocabularies written here: merges by rank, byte-level Unicode,
glide-text2im's padding / mask, CLIP's framing, and loading from files (.gz or plain)."""
import gzip
import json
import sys

import numpy as np
import pytest

pytest.importorskip("regex")

from diffjax import tokenizer as T  # noqa: E402

PRINTABLE = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # the first 94 byte characters


def write(path, text, gz=True):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def gpt2(tmp_path):
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "o r", "b c", "a b"]
    chars = list(T.bytes_to_unicode().values())
    vocab = chars + ["".join(m.split()) for m in merges] + ["<|endoftext|>"]
    write(tmp_path / "encoder.json.gz", json.dumps({v: i for i, v in enumerate(vocab)}))
    write(tmp_path / "vocab.bpe", "#version: 0.2\n" + "\n".join(merges) + "\n", gz=False)
    return T.load_tokenizer(tmp_path), vocab


def test_gpt2_merges_lowest_rank_first(gpt2):
    tok, vocab = gpt2
    # hello: (h,e) -> (l,l) -> (he,ll) -> (hell,o); " world": (Ġ,w) -> (Ġw,o), then no merge applies.
    want = ["hello", "Ġwo", "r", "l", "d"]
    assert tok.encode("Hello world") == [vocab.index(s) for s in want]
    assert tok.encode("HELLO WORLD") == tok.encode("hello world")  # GLIDE lower-cases
    # "b c" outranks "a b": abc -> a + bc, not ab + c.
    assert tok.encode("abc") == [vocab.index("a"), vocab.index("bc")]
    assert tok.n_vocab == len(vocab) and tok.end_token == len(vocab) - 1


def test_gpt2_bytes_round_trip(gpt2):
    tok, vocab = gpt2
    # é is UTF-8 c3 a9 -> characters 'Ã' (0xc3) and '©' (0xa9), printable Latin-1 kept as is.
    assert tok.encode("é") == [vocab.index("Ã"), vocab.index("©")]
    text = "héllo wörld, 42 €!"
    assert tok.decode(tok.encode(text)) == text


def test_padded_tokens_and_mask(gpt2):
    tok, _ = gpt2
    ids = tok.encode("hello world")
    tokens, mask = T.tokens_and_mask(tok, ["hello world", ""], text_ctx=8)
    end = tok.end_token
    np.testing.assert_array_equal(tokens, [ids + [end] * 3, [end] * 8])
    np.testing.assert_array_equal(mask, [[True] * 5 + [False] * 3, [False] * 8])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert tok.padded_tokens_and_mask(ids, 3) == (ids[:3], [True] * 3)  # truncation
    empty_tokens, empty_mask = T.empty_tokens_and_mask(tok, 2, 4)
    np.testing.assert_array_equal(empty_tokens, np.full((2, 4), end))
    assert not empty_mask.any()
    with pytest.raises(ValueError, match="text_ctx=0"):
        tok.padded_tokens_and_mask(ids, 0)


def test_clip_vocabulary_and_framing(tmp_path):
    path = write(tmp_path / "bpe_simple_vocab_16e6.txt.gz",
                 "bpe_simple_vocab_16e6.txt#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n")
    tok = T.load_tokenizer(path)
    assert isinstance(tok, T.CLIPTokenizer)
    # 256 byte characters, the same with </w>, 4 merges, start, end.
    assert tok.n_vocab == 518 and (tok.start_token, tok.end_token) == (516, 517)
    # ASCII printable characters come first, in byte order: index = ord(c) - 33.
    word = [PRINTABLE.index(c) for c in "worl"] + [256 + PRINTABLE.index("d")]
    ids = tok.encode("  Hello \n world!")  # whitespace collapsed, lower-cased, words end in </w>
    assert ids == [512 + 3] + word + [256 + PRINTABLE.index("!")]
    padded, length = tok.padded_tokens_and_len(ids, 5)
    assert padded == [516] + ids[:3] + [517] and length == 5
    padded, mask = tok.padded_tokens_and_mask(ids[:1], 5)
    assert padded == [516, 515, 517, 0, 0] and mask == [True, True, True, False, False]
    assert tok.decode(ids) == "hello world ! "  # every word, "!" included, ends in </w>


def test_missing_files_name_the_fix(tmp_path):
    write(tmp_path / "encoder.json", "{}", gz=False)
    with pytest.raises(FileNotFoundError, match=r"no vocab.bpe or vocab.bpe.gz"):
        T.load_tokenizer(tmp_path)


def test_clip_cleaning_is_ftfy_then_html_then_whitespace(tmp_path, monkeypatch):
    tok = T.load_tokenizer(write(tmp_path / "bpe_simple_vocab_16e6.txt.gz",
                                 "bpe_simple_vocab_16e6.txt#version: 0.2\nh e\n"))
    # ftfy repairs mojibake (UTF-8 read as Latin-1: 'Ã©' -> 'é'), then HTML is unescaped twice.
    assert tok.clean_text(" Caf\u00c3\u00a9\t &amp;lt;B&amp;gt;\n ") == "café <b>"
    monkeypatch.setitem(sys.modules, "ftfy", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install ftfy==6\.3\.1"):
        tok.encode("hello")
