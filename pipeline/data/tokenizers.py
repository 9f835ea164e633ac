"""Tiny tokenizers for the demo and the tests, saved so that `AutoTokenizer` loads them back
through the same path as a real checkpoint's tokenizer.

Both keep the LLaMA conventions the templates rely on: pad=0, bos=1 (<s>), eos=2 (</s>), unk=3.

    build_word_tokenizer(words, "models/tokenizer")          # demo: one token per word
    build_sentencepiece_tokenizer(texts, "models/tok", 400)  # MobileVLM's real format: tokenizer.model
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer", "build_sentencepiece_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path) -> Path:
    """A word-level `tokenizers` model (whitespace + punctuation split), as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def build_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A BPE SentencePiece `tokenizer.model` with byte fallback, the format MobileVLM ships.

    Only tokenizer.model and tokenizer_config.json are written (no tokenizer.json), so loading
    goes through transformers' SentencePiece conversion exactly as for the real checkpoints.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            byte_fallback=True,
            character_coverage=1.0,
            # LLaMA's own settings: text reaches the model as written (no NFKC, no folding of
            # whitespace runs, newlines kept), digits split, one leading "▁" added. transformers'
            # converted tokenizer does exactly this; the SentencePiece default (nmt_nfkc, extra
            # whitespace removed) made the authors' slow tokenizer give other ids than ours.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
