"""Measuring a quantized model against its full-precision original: logit error, KL, flips, bytes on disk."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FirstAnswerEval", "LogitMetrics", "compare_logits", "answer_metrics", "linear_bytes_on_disk"]


@dataclass
class LogitMetrics:
    """How far quantized logits are from the reference, over the selected positions."""

    rel_error: float  # ||q - ref||_F / ||ref||_F
    kl: float  # mean KL(ref || q) per position, nats
    agreement: float  # fraction of positions whose argmax is unchanged

    def __str__(self) -> str:
        return f"rel.err {self.rel_error:.4f}  KL {self.kl:.3e}  top-1 agreement {self.agreement:.1%}"


@torch.no_grad()
def compare_logits(ref: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> LogitMetrics:
    """Compare ``[..., vocab]`` logits; ``mask`` (same leading shape, bool) selects the positions."""
    ref, q = ref.float().reshape(-1, ref.shape[-1]), q.float().reshape(-1, q.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        ref, q = ref[keep], q[keep]
    rel = float((q - ref).norm() / ref.norm().clamp_min(1e-12))
    kl = float(F.kl_div(F.log_softmax(q, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean"))
    agree = float((q.argmax(-1) == ref.argmax(-1)).float().mean())
    return LogitMetrics(rel, kl, agree)


class FirstAnswerEval:
    """First-answer-token log-probabilities of a model on held-out ``{"image", "question", "answer"}`` rows.

    Each row's question goes through the processor's chat template (one image, a generation prompt), batched
    with the tokenizer's padding; the log-softmax at the last prompt position is the model's distribution over
    the answer's first token. Inputs are encoded once; :meth:`logprobs` runs any model of the same processor.
    :meth:`metrics` compares a quantized model's log-probabilities with the full-precision ones: accuracy
    (argmax = the answer's first token), KL(FP || quantized) and agreement (argmax unchanged).
    """

    def __init__(self, processor, rows, batch_size: int = 64) -> None:
        self.rows = list(rows)
        tok = processor.tokenizer
        self.answers = torch.tensor([tok(r["answer"], add_special_tokens=False)["input_ids"][0] for r in self.rows])
        self.batches: list[tuple[dict, torch.Tensor]] = []
        for start in range(0, len(self.rows), batch_size):
            part = self.rows[start : start + batch_size]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for r in part
            ]
            enc = processor(text=texts, images=[[r["image"]] for r in part], return_tensors="pt", padding=True)
            mask = enc["attention_mask"]
            self.batches.append((dict(enc), (mask * torch.arange(mask.shape[1])).argmax(-1)))

    @torch.inference_mode()
    def logprobs(self, model) -> torch.Tensor:
        """``[rows, vocab]`` float32 log-probabilities of the first answer token."""
        device = next(model.parameters()).device
        out = []
        for enc, last in self.batches:
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.append(torch.log_softmax(logits[torch.arange(len(last)), last.to(device)].float(), -1).cpu())
        return torch.cat(out)

    @staticmethod
    def item_kl(ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """KL(FP || quantized) of each row's first answer token."""
        return (ref.exp() * (ref - q)).sum(-1)

    def metrics(self, ref: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
        return {
            "accuracy": float((q.argmax(-1) == self.answers).float().mean()),
            "kl": float(self.item_kl(ref, q).mean()),
            "agreement": float((q.argmax(-1) == ref.argmax(-1)).float().mean()),
        }


@torch.no_grad()
def answer_metrics(reference, model, samples) -> LogitMetrics:
    """Logit metrics over the answer-predicting positions of calibration-style ``samples``.

    Position ``t`` predicts token ``t + 1``; it counts when ``labels[t + 1]`` is an answer token. Metrics
    are pooled over all samples' answer positions.
    """
    refs, outs = [], []
    for s in samples:
        mask = torch.zeros_like(s.labels[0], dtype=torch.bool)
        mask[:-1] = s.labels[0, 1:] != -100
        refs.append(reference(**s.inputs).logits[0][mask].float())
        outs.append(model(**s.inputs).logits[0][mask].float())
    return compare_logits(torch.cat(refs), torch.cat(outs))


def linear_bytes_on_disk(folder: str | os.PathLike, module_regex: str) -> dict[str, int]:
    """Bytes stored in ``folder``'s safetensors for modules matching ``module_regex`` (searched in the key).

    Returns ``{"stored": bytes of every tensor of those modules except biases, "weights": number of weight
    elements}``, where the element count comes from ``weight`` shapes, or ``weight_shape`` when packed.
    """
    from safetensors import safe_open

    pattern = re.compile(module_regex)
    stored = elements = 0
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if not pattern.search(module) or leaf == "bias":
                    continue
                t = f.get_slice(key)
                shape = t.get_shape()
                numel = 1
                for s in shape:
                    numel *= s
                stored += numel * _DTYPE_BYTES[t.get_dtype()]
                if leaf == "weight":
                    elements += numel
                elif leaf == "weight_shape":
                    rows, cols = (int(v) for v in f.get_tensor(key).tolist())
                    elements += rows * cols
    return {"stored": stored, "weights": elements}


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F64": 8}
