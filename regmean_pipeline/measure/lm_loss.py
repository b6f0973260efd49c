"""How well a causal language model gives the responses of a chat task: the mean loss of the assistant's
tokens (each predicted from everything before it) and its perplexity."""

from __future__ import annotations

import math

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from regmean_pipeline.measure.chat import ChatEncoder, Encoded
from regmean_pipeline.measure.data import right_padded


@torch.inference_mode()
def response_loss(model: torch.nn.Module, tokenizer, conversations: list[list[dict]], *, batch_size: int = 16,
                  max_length: int | None = None, desc: str = "loss", progress: bool = True) -> dict:
    """{'loss', 'perplexity', 'tokens'}: the token-weighted mean cross-entropy of the assistant's tokens
    (as the chat template marks them, see ChatEncoder), over conversations cut to ``max_length`` tokens."""
    model.eval()
    device = next(model.parameters()).device
    encoded = ChatEncoder(tokenizer).encode(conversations)
    if max_length:
        encoded = [Encoded(e.ids[:max_length], e.response[:max_length]) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    with tqdm(total=len(order), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            ids = right_padded([e.ids for e in batch], pad).to(device)
            real = right_padded([[1] * len(e.ids) for e in batch], 0).to(device)
            counted = right_padded([e.response for e in batch], 0).to(device).bool()
            logits = model(input_ids=ids, attention_mask=real).logits.float()
            # Token t is predicted at position t - 1.
            losses = functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            keep = counted[:, 1:]
            total += float(losses[keep].double().sum())
            tokens += int(keep.sum())
            bar.update(len(batch))
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens}
