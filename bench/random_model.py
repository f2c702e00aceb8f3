"""Write a random-initialised model of a real architecture's shape, for GPU runs and benchmarks.

Speed and memory do not depend on the weight values, so a Llama-3.2-1B-shaped model with random
weights measures what the real one would. The tokenizer is the small BPE the tests train on the
spot (its ids are a subset of the model's vocabulary).

    python -m bench.random_model DEST --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, rope_theta=500000.0),
}


def make_random_model(dest: Path, shape: str, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tiny_model

    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(dest)
    config = LlamaConfig(max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **SHAPES[shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(dest)
    del model
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    args = ap.parse_args()
    if Path(args.dest).exists():
        shutil.rmtree(args.dest)
    make_random_model(Path(args.dest), args.shape)
    print(f"wrote {args.shape} to {args.dest}")


if __name__ == "__main__":
    main()
