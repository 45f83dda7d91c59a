"""Quality and diversity metrics: perplexity under the target, BLEU / ROUGE against references,
distinct-n and self-BLEU across the beams a beam search returns.

BLEU is sacrebleu's corpus BLEU (default 13a tokenisation, 0-100); ROUGE is rouge-score's F1
(0-1, mean over prompts). Distinct-n counts token-id n-grams (exact for code, no word splitting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


@torch.inference_mode()
def continuation_nll(model, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``output_ids`` after ``prompt_ids`` under ``model``
    (one forward in float32 logits), and the number of tokens scored."""
    if not output_ids:
        return 0.0, 0
    ids = torch.tensor([list(prompt_ids) + list(output_ids)], dtype=torch.long)  # [1, P + N]
    logits = model(input_ids=ids).logits[0].float()  # [P + N, V]
    n_prompt = len(prompt_ids)
    pred = logits[n_prompt - 1 : -1]  # [N, V] the logits that predict each output token
    target = ids[0, n_prompt:]  # [N]
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
    return float(nll), len(output_ids)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL) over all scored tokens; NaN when nothing was scored."""
    return math.exp(nll_sum / count) if count else float("nan")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L over the pairs."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=False)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(hypotheses), 1)
    return {k: v / n for k, v in totals.items()}


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over ``sequences`` together (in [0, 1]; 0 if there are none)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean sentence BLEU of each text against all the others (0-100; high = beams alike).
    None for fewer than two texts."""
    import sacrebleu

    if len(texts) < 2:
        return None
    scores = [
        sacrebleu.sentence_bleu(texts[i], [t for j, t in enumerate(texts) if j != i]).score for i in range(len(texts))
    ]
    return float(sum(scores) / len(scores))
