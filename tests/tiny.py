"""A tiny real model and dataset for tests: a random 2-layer Llama with its own small BPE tokenizer.

Everything is built from text in this file, in about a second on a CPU, with fixed seeds, so two
calls produce byte-identical folders. The model is random (it knows nothing), but it is a real
Hugging Face model folder: AutoModelForCausalLM / AutoTokenizer load it, peft wraps it, and a few
optimizer steps visibly lower its loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Special tokens, in id order: Llama's names, so code that looks for <s> / </s> finds them.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# 256 byte-level symbols + 4 specials leave ~140 merges: enough for common English words.
VOCAB_SIZE = 400
SEED = 1234

# A few hundred words of plain English: what the tokenizer is trained on and what the sample
# dataset talks about.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to write short answers.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Water boils at one hundred degrees. Ice melts when the sun is warm. The sky is blue on a clear day.
Cats like to sleep in the sun. Dogs like to run in the park. Birds sing in the morning.
To make tea, boil water, add the leaves and wait three minutes. Then pour the tea into a cup.
The train leaves the station at nine. The bus is late again today. We walk to the market.
A list has items. A story has a beginning, a middle and an end. A question asks for an answer.
Write a short poem about the sea. The sea is wide and deep and the waves are grey and green.
Translate the sentence into French. Summarise the paragraph in one line. Give three examples.
Instruction: explain the idea in simple words. Input: the text to use. Response: the answer.
Numbers: one two three four five six seven eight nine ten. Colours: red green blue yellow black.
The engineer trains a model on a dataset, saves the adapter and checks the loss on held out data.
Learning is slow at first and then faster. Good data matters more than a large number of steps.
"""

# Alpaca-style rows (instruction, input, output); every third has an empty input.
_ROWS = [
    ("What is the capital of France?", "", "Paris is the capital of France."),
    ("Name a colour.", "the sky", "The sky is blue."),
    ("Give three numbers.", "", "One, two, three."),
    ("Summarise the text.", "Cats like to sleep in the sun.", "Cats sleep in the sun."),
    ("What do dogs like?", "the park", "Dogs like to run in the park."),
    ("How do you make tea?", "", "Boil water, add the leaves and wait three minutes."),
    ("When does the train leave?", "the station", "The train leaves the station at nine."),
    ("Write a line about the sea.", "waves", "The waves are grey and green."),
    ("What is the capital of Italy?", "", "Rome is the capital of Italy."),
    ("When do birds sing?", "morning", "Birds sing in the morning."),
    ("Translate into French.", "the cat", "le chat"),
    ("What melts in the sun?", "", "Ice melts when the sun is warm."),
]

RAW_TEXT = (CORPUS + "\n") * 3


def _train_tokenizer(words: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer (any text encodes, no <unk> in practice), Llama-style <s> prefix."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    if words:
        lines.append(" ".join(words))
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama's tokenizer: encode(..., add_special_tokens=True) starts with <s>, no </s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def make_tiny_model(dest: Path, vocab_words: list[str] | None = None) -> Path:
    """Write a random 2-layer LlamaForCausalLM and its BPE tokenizer into `dest`; return `dest`.

    `vocab_words` are extra words the tokenizer is trained on (besides the built-in text), so a
    test can make sure they become few tokens. Same arguments, same bytes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(list(vocab_words or []))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=512, padding_side="right")
    tokenizer.save_pretrained(dest)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Seed a forked RNG so building a model never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    return dest


def tiny_rows(n: int = 24) -> list[dict[str, str]]:
    """`n` Alpaca rows, cycling through the built-in ones (so some have an empty input)."""
    return [dict(zip(("instruction", "input", "output"), _ROWS[i % len(_ROWS)], strict=True))
            for i in range(n)]


def write_tiny_dataset(path: Path, n: int = 24) -> Path:
    """Write an Alpaca-style JSON array of `n` instruction/input/output rows to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_rows(n), indent=2), encoding="utf-8")
    return path


def write_tiny_raw_text(path: Path) -> Path:
    """Write a few paragraphs of plain text (for raw-text training) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RAW_TEXT, encoding="utf-8")
    return path
