"""Real tokenizers built on the spot for the ``formats`` tests, and checks of what they do.

Two byte-level BPE tokenizers wrapped in ``PreTrainedTokenizerFast``, both with ``<pad>`` = 0,
``<s>`` (BOS) = 1 and ``</s>`` (EOS) = 2 and a post-processor that puts BOS in front:

* :func:`char_tokenizer` has no merges, so every ASCII character is exactly one token. Tests
  of chunking and cutting use it because expected outputs can then be written by hand.
* :func:`bpe_tokenizer` has merges, so tokens span several characters and can cross a
  ``train_only_after`` boundary; masking and property tests use it.

The tests in this file pin the properties the other files rely on, so a change in the
``tokenizers`` library shows up here first rather than as a puzzling failure elsewhere.
"""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
CORPUS = [
    "User: what is the capital of France?\nAssistant: Paris is the capital of France.\n",
    "### Instruction:\nSay hello.\n\n### Response:\nhello there, how are you?\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "abab ab ba\nab\n\nba ab aa bb\n",
]


def _wrap(model_tokenizer: Tokenizer, add_bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level pieces around a trained BPE model, wrapped for ``transformers``."""
    model_tokenizer.decoder = decoders.ByteLevel()
    if add_bos:
        model_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=model_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _train(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return tokenizer


@cache
def char_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte: 3 specials + 256 byte symbols, no merges."""
    return _wrap(_train(vocab_size=len(SPECIALS) + 256), add_bos)


@cache
def bpe_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A small BPE with merges learned from :data:`CORPUS`."""
    return _wrap(_train(vocab_size=360), add_bos)


def test_special_token_ids() -> None:
    for tok in (char_tokenizer(), bpe_tokenizer()):
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_char_tokenizer_is_one_token_per_character() -> None:
    tok = char_tokenizer()
    ids = tok.encode("ab\nc")
    assert ids[0] == 1
    assert len(ids) == 5
    assert tok.encode("ab\nc", add_special_tokens=False) == ids[1:]


def test_bpe_tokenizer_merges() -> None:
    tok = bpe_tokenizer()
    assert len(tok.encode("hello there", add_special_tokens=False)) < len("hello there")


def test_decode_keeps_special_tokens_as_text_and_round_trips() -> None:
    tok = bpe_tokenizer()
    text = "User: hello\n\nthere"
    assert tok.decode(tok.encode(text)) == "<s>" + text
    assert tok.decode(tok.encode(text) + [2]) == "<s>" + text + "</s>"
    # The BOS text parses back to the BOS id: this is how raw-text chunks get a double BOS.
    assert tok.encode("<s>hi")[:2] == [1, 1]


def test_tokenizer_without_bos() -> None:
    tok = char_tokenizer(add_bos=False)
    assert tok.encode("ab") == tok.encode("ab", add_special_tokens=False)
    assert len(tok.encode("ab")) == 2
