"""The most `bench/train_throughput.py`'s engine can gain over its peers by doing less work:
matmul FLOPs per non-padding token of each side on a bed, counted from the model's shape and
the bed's rows (no timing). At equal matmul speed, the ratio of these counts is the speed-up
the engine gets from skipping work alone.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/flop_ceiling.py \
        [--model small|base] [--vocab 32000] [--rows 400] [--padding 0.064]

Counted per token, the same for every side: the frozen decoder's linear layers, forward (2N)
plus the input gradient (2N), N their weights; their rank-`--rank` LoRA branches (all-linear,
as the bench trains them), 6r(in + out) each (forward 2r(in + out); backward the input and
both weight gradients, 4r(in + out)). Where a side runs it, the output head (4 x hidden x
vocab): the engine at target positions only, `trl_packed` at every position,
`trainer_grouped` at every position and its padding (`--padding`: an input, the padding
fraction `train_throughput.py` measured for trainer_grouped on this bed). Attention scores
are left out: about 2% of a token's work at this bed's lengths, and no less for any peer.
Also printed: the ceiling if the engine ran the last decoder layer's q, o and MLP only at
target positions (k and v are still needed at every position).
"""

from __future__ import annotations

import argparse

from bench import train_throughput as tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(tt.MODELS), default="base")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--padding", type=float, default=0.064)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    text = tt.WordText(seed=0)
    tok = tt.bpe_tokenizer(text.corpus(8000), args.vocab)
    prompt = completion = 0
    for row in text.rows(args.rows):
        ids, labels = tt.encode(tok, row)
        targets = sum(1 for label in labels if label != -100)
        completion += targets
        prompt += len(ids) - targets
    share = completion / (prompt + completion)

    shape = tt.MODELS[args.model]
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    per_layer = 4 * h * h + 3 * h * inter  # q, k, v, o + gate, up, down (full-width k and v)
    lora = 6 * args.rank * (4 * 2 * h + 3 * (h + inter))  # the same seven (in + out) sums
    decoder = layers * (4 * per_layer + lora)
    head = 4 * h * len(tok)
    engine = decoder + share * head
    packed = decoder + head
    grouped = (decoder + head) / (1 - args.padding)
    # q, o and the MLP of the last layer, with their LoRA branches, at non-target positions
    trimmed = engine - (1 - share) * (
        4 * (2 * h * h + 3 * h * inter) + 6 * args.rank * (2 * 2 * h + 3 * (h + inter))
    )
    print(
        f"{args.model}: {prompt + completion} tokens in {args.rows} rows, target share "
        f"{share:.4f}, vocabulary {len(tok)}"
    )
    print(
        f"MFLOP per non-padding token: engine {engine / 1e6:.1f}, trl_packed "
        f"{packed / 1e6:.1f}, trainer_grouped {grouped / 1e6:.1f}"
    )
    print(
        f"ceiling at equal matmul speed: vs trl_packed {packed / engine:.3f}x, vs "
        f"trainer_grouped {grouped / engine:.3f}x; with the last layer trimmed to targets "
        f"{packed / trimmed:.3f}x / {grouped / trimmed:.3f}x"
    )


if __name__ == "__main__":
    main()
