"""What the desktop and the phone generators share (numpy only): drawing the next token and
turning a prompt into ids with the stop tokens that end it."""

from __future__ import annotations

import numpy as np

# Chat templates end a turn with one of these; generation with --chat stops at them.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, otherwise a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def prompt_ids(tok, prompt: str, chat: bool) -> tuple[list[int], set[int]]:
    """(token ids of the prompt, ids that stop generation): with ``chat`` the prompt is
    wrapped in the tokenizer's chat template and the template's end-of-turn ends a reply."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt, add_special_tokens=tok.adds_bos)
    stops = {tok.eos_id} | ({tok.token_to_id(t) for t in END_OF_TURN} if chat else set())
    stops.discard(None)
    return ids, stops
