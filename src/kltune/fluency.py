r"""Fluency as a number: how likely the reference finds a policy's completions.

"With the KL penalty the completions stay fluent" is a claim about text. Its
measurable form: the per-token perplexity of the completions under the
reference model π_ref (a pretrained LM, so a judge of fluent text),

.. math::
    \mathrm{PPL}_\text{ref} = \exp\Bigl(-\frac{1}{N}\sum_{i,t}
        \log\pi_\text{ref}(y_{i,t}\mid x_i, y_{i,<t})\Bigr),

over the :math:`N` tokens of all completions :math:`y_i` of prompts :math:`x_i`. A
collapsed policy's "great great great" is cheap to score but far from what the
reference would write, and degenerate text drives it up; the reference's own
samples give the baseline value. It works from texts (for example the samples a
run logged), so no checkpoint of the trained policy is needed.
"""

import math
from collections.abc import Sequence

import torch

from kltune.policy import Policy, teacher_forced
from kltune.reference import Reference

__all__ = ["reference_perplexity"]


def reference_perplexity(
    reference: Reference,
    policy: Policy,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
) -> float:
    """Per-token perplexity of ``completions`` given ``prompts`` under ``reference``.

    Each completion is re-tokenised with the policy's tokenizer (no special
    tokens added) after its prompt is encoded as :meth:`Policy.encode_prompts`
    does; completions that encode to no token are left out.

    Args:
        reference: π_ref (its :meth:`~kltune.reference.Reference.logprobs` scores the tokens).
        policy: supplies the tokenizer and prompt encoding (its weights are not used).
        prompts: one prompt per completion.
        completions: the texts to judge.
        batch_size: completions scored per forward.

    Returns:
        The perplexity, ≥ 1; NaN when no completion has a token.

    Raises:
        ValueError: ``prompts`` and ``completions`` differ in length, or either is empty.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"reference_perplexity needs one prompt per completion, got {len(prompts)} "
            f"prompts and {len(completions)} completions (and at least one)"
        )
    kept = [
        (prompt, completion)
        for prompt, completion in zip(prompts, completions, strict=True)
        if policy.tokenizer(completion, add_special_tokens=False).input_ids
    ]
    total, count = 0.0, 0
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        rollout = teacher_forced(policy, [p for p, _ in chunk], [c for _, c in chunk])
        with torch.no_grad():
            logprobs = reference.logprobs(rollout)
        total += float(logprobs[rollout.response_mask].double().sum())
        count += int(rollout.response_mask.sum())
    return math.exp(-total / count) if count else math.nan
