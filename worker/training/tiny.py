"""A tiny LLaMA-architecture base model with a byte-level tokenizer, built offline.

Tests, benchmarks and the embedded `tiny-llama` registry entry use it:
`python -m worker.training.tiny --out DIR` or `build_tiny_model(DIR)`. The folder holds
`config.json`, `model.safetensors`, `generation_config.json` and a tokenizer
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) that `AutoModelForCausalLM`
and `AutoTokenizer` load with no network. The weights are random (seeded): the model knows
nothing, which is what the learning test wants.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
DEFAULT_SIZE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte (ids 0-255) plus the special tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # bytes_to_unicode order, so that id == byte value
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    for i, token in enumerate(specials):
        vocab[token] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 256)]
    )
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` backend holding BOS, EOS, PAD and the role tokens, as the transformers
    tokenizer the tiny model ships (special tokens, length limit, chat template)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=DEFAULT_SIZE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **size_overrides: Any,
) -> Path:
    """Write a random tiny LLaMA + tokenizer to `out_dir` and return it.

    `size_overrides` replace entries of `DEFAULT_SIZE` (e.g. `hidden_size=512` for benchmarks).
    `tokenizer` (default: the byte-level one) sets the vocabulary; it needs BOS, EOS and PAD
    tokens.
    """
    out_dir = Path(out_dir)
    unknown = set(size_overrides) - set(DEFAULT_SIZE)
    if unknown:
        raise ValueError(f"unknown size override(s): {', '.join(sorted(unknown))}")
    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**DEFAULT_SIZE, **size_overrides},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # float32 parameters
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny LLaMA base model offline.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, seed=args.seed)
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    print(f"tiny model with {params:,} parameters written to {path}")


if __name__ == "__main__":
    main()
