"""Small local tokenizers for the synthetic tasks, and loading of a model's tokenizer.

The synthetic tasks (rule110, depo and the default gsm_infinite vocabulary) need no pretrained tokenizer: each one is a
word-level vocabulary built with the `tokenizers` library and wrapped as a `transformers.PreTrainedTokenizerFast`, so it
saves with `save_pretrained`, loads back with `AutoTokenizer.from_pretrained` and never downloads anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<eos>"

# One token per character, except bracketed names such as "<t32>" or "<pad>", which are one token each.
_CHAR_PATTERN = Regex(r"<[^<>\s]*>|.")

TokenizerLike = str | os.PathLike | PreTrainedTokenizerBase


def build_word_tokenizer(
    words: Iterable[str],
    *,
    char_level: bool = False,
    lowercase: bool = False,
    split_punctuation: bool = False,
    eos: bool = False,
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over a fixed vocabulary.

    The vocabulary is `<pad>`, `<unk>`, optionally `<eos>`, then `words` in order (duplicates dropped), so ids are
    stable as long as `words` is. Text is split on whitespace; with `char_level` each character (or each `<...>` name)
    is a token and decoding concatenates tokens, otherwise decoding joins tokens with spaces. `split_punctuation` also
    splits runs of punctuation from words ("5." -> "5", "."), and `lowercase` lowercases text before the lookup.
    """
    specials = [PAD_TOKEN, UNK_TOKEN] + ([EOS_TOKEN] if eos else [])
    vocab: dict[str, int] = {}
    for word in [*specials, *words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    if char_level:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(_CHAR_PATTERN, behavior="isolated")]
        )
        backend.decoder = decoders.Fuse()
    elif split_punctuation:
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN if eos else None,
        padding_side="right",
    )


def load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """Return a tokenizer object from a path, a Hub name or an object, making sure it has a pad token.

    A tokenizer without a pad token gets its EOS token as pad token (set on the object), since the collator needs one.
    """
    tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) < 2:  # transformers 5 builds an empty tokenizer from a folder without tokenizer files
        raise ValueError(
            f"tokenizer {str(tokenizer)!r} has no vocabulary (no tokenizer.json or vocabulary files there); "
            "name a folder or Hub id that holds the tokenizer"
        )
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok
