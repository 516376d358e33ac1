r"""RLHF from preferences: pairs, a Bradley–Terry reward model, and DPO.

InstructGPT-style RLHF starts before PPO: people compare two completions of a
prompt, a reward model is fitted to their choices, and the policy is tuned
against that learned reward under a KL penalty. This module holds the first
two steps and the alternative that skips the reward model:

- :class:`Preference`: one judged pair (prompt, chosen, rejected), validated;
  :func:`judge_pairs` labels pairs with any :class:`~kltune.rewards.RewardFn` as
  the judge (a stand-in for people, with label noise), and
  :func:`save_preferences` / :func:`load_preferences` keep them as JSON lines.
- :class:`RewardModel`: a transformers backbone with a scalar head on the last
  token, fitted by :func:`fit_reward_model` with the Bradley–Terry loss
  (:func:`kltune.functional.bradley_terry_loss`). It *is* a ``RewardFn``: pass
  it to :class:`~kltune.loop.Blocks` like any other reward.
- :func:`dpo_step` / :func:`fit_dpo`: Direct Preference Optimisation of a
  :class:`~kltune.policy.Policy` against a :class:`~kltune.reference.Reference` on
  the same pairs (:func:`kltune.functional.dpo_loss`).

The learned reward is where the KL penalty matters most: the policy finds the
reward model's errors, and the proxy reward rises while the judge's falls
(``examples/overoptimisation.py``; Gao et al. 2022).
"""

import dataclasses
import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

import kltune.functional as KF
from kltune._checks import check_count
from kltune._runfiles import io_error, strict_json, write_bytes
from kltune.encoding import start_token_id
from kltune.policy import Policy, teacher_forced
from kltune.reference import Reference
from kltune.rewards import RewardFn, _check_utf8, _preview, score_completions

#: One logged step of a fit: ``step`` and ``epoch`` (ints) and float metrics.
Record = dict[str, float | int]

__all__ = [
    "Preference",
    "RewardModel",
    "dpo_losses",
    "dpo_step",
    "evaluate_reward_model",
    "fit_dpo",
    "fit_reward_model",
    "judge_pairs",
    "load_preferences",
    "preference_pairs",
    "save_preferences",
]


@dataclass(frozen=True)
class Preference:
    """One judged pair: for ``prompt``, ``chosen`` was preferred to ``rejected``.

    Raises:
        TypeError: a field is not a str.
        ValueError: ``chosen`` or ``rejected`` is empty (or only whitespace), the
            two are identical (no preference to learn), or a text is not valid
            Unicode.
    """

    prompt: str
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("chosen", "rejected"):
            if not getattr(self, name).strip():
                raise ValueError(
                    f"{name} is empty for prompt {_preview(self.prompt)}: "
                    "a preference compares two completions with text"
                )
        if self.chosen == self.rejected:
            raise ValueError(
                f"chosen and rejected are the same text ({_preview(self.chosen)}) for prompt "
                f"{_preview(self.prompt)}: an identical pair holds no preference; drop it"
            )
        _check_utf8([self.prompt, self.chosen, self.rejected])


def preference_pairs(
    prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]
) -> list[Preference]:
    """Pairs from three aligned lists of texts.

    Raises:
        ValueError: the lists differ in length or are empty, or a pair is invalid
            (see :class:`Preference`; the message gives its index).
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected "
            "completions; they must be aligned (one of each per pair)"
        )
    if not prompts:
        raise ValueError("no preference pairs: the lists are empty")
    pairs = []
    for i, texts in enumerate(zip(prompts, chosen, rejected, strict=True)):
        try:
            pairs.append(Preference(*texts))
        except (TypeError, ValueError) as error:
            raise type(error)(f"pair {i}: {error}") from None
    return pairs


def judge_pairs(
    judge: RewardFn,
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    *,
    flip_probability: float = 0.0,
    seed: int = 0,
) -> tuple[list[Preference], list[bool]]:
    """Label pairs of completions with a judge: the higher-scored one is chosen.

    A stand-in for human labellers in offline experiments. With probability
    ``flip_probability`` a label is flipped (independently, seeded): people
    disagree, and a reward model cannot beat ``1 - flip_probability`` accuracy on
    such labels. Pairs the judge scores equal, or whose texts are identical or
    empty, are dropped (no preference).

    Args:
        judge: scores completions; higher is preferred.
        prompts: one prompt per pair.
        first: one completion of each prompt.
        second: another completion of the same prompt.
        flip_probability: label noise in [0, 0.5).
        seed: seeds the flips.

    Returns:
        The pairs, and for each whether its label was flipped (so accuracy can be
        measured against the judge's true preference as well as the noisy label).

    Raises:
        ValueError: the lists are not aligned or empty, ``flip_probability`` is
            outside [0, 0.5), or the judge returns bad scores.
    """
    if not 0 <= flip_probability < 0.5:
        raise ValueError(f"flip_probability must be in [0, 0.5), got {flip_probability}")
    if not len(prompts) == len(first) == len(second) or not prompts:
        raise ValueError(
            f"got {len(prompts)} prompts, {len(first)} first and {len(second)} second "
            "completions; they must be aligned and non-empty"
        )
    both = score_completions(judge, [*prompts, *prompts], [*first, *second])
    a, b = both[: len(prompts)].tolist(), both[len(prompts) :].tolist()
    rng = random.Random(seed)
    pairs, flipped = [], []
    for prompt, x, y, sx, sy in zip(prompts, first, second, a, b, strict=True):
        flip = rng.random() < flip_probability  # drawn for every pair: stable under drops
        if sx == sy or x == y or not x.strip() or not y.strip():
            continue
        chosen, rejected = (x, y) if (sx > sy) != flip else (y, x)
        pairs.append(Preference(prompt, chosen, rejected))
        flipped.append(flip)
    return pairs, flipped


def save_preferences(pairs: Sequence[Preference], path: str | Path) -> None:
    """Write pairs as JSON lines (``{"prompt", "chosen", "rejected"}``), all or nothing."""
    path = Path(path)
    lines = "".join(strict_json(dataclasses.asdict(p)) + "\n" for p in pairs)
    partial = path.with_name(path.name + ".partial")
    write_bytes(partial, lines.encode())
    try:
        partial.replace(path)
    except OSError as error:
        raise io_error(error, path, "write") from error


def load_preferences(path: str | Path) -> list[Preference]:
    """Read pairs written by :func:`save_preferences` (or any JSON lines with the
    three keys).

    Raises:
        ValueError: a line is not JSON, lacks a key, or is an invalid pair; the
            message gives the file and line number.
    """
    path = Path(path)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append(Preference(record["prompt"], record["chosen"], record["rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {number}: not a preference pair: {error}") from None
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


class RewardModel(nn.Module):
    r"""A learned reward: a transformer backbone and a linear head on the last token.

    The text ``prompt + completion`` (then the EOS token, when the tokenizer has
    one, so every text ends at the same kind of position) is encoded, the
    backbone's last hidden state at the final real token goes through a
    ``Linear(hidden, 1)`` head, and that number is the score. The head starts at
    zero, so an untrained model scores every text 0.

    It is a :class:`~kltune.rewards.RewardFn` with its own tokenizer: calling it
    scores texts without gradient, in eval mode, in batches, on the CPU as
    float32. :meth:`scores` is the same with gradient, for fitting. For LoRA,
    wrap the backbone with peft before building the model (only the adapter
    and the head then train). :meth:`from_causal_lm` takes the backbone of a
    causal LM (its ``base_model``) without copying it: load a separate model for
    the reward when the policy is the same checkpoint.

    Args:
        backbone: a transformers base model whose output has ``last_hidden_state``
            (``AutoModel``, a causal LM's ``base_model``, or a peft wrapper of one).
        tokenizer: its tokenizer.
        batch_size: texts per forward when called as a reward.
        max_length: longest text in tokens; by default the backbone's context.

    Raises:
        ValueError: ``batch_size`` < 1, or the backbone has no input embedding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        embeddings: Any = backbone.get_input_embeddings()  # type: ignore[operator]
        if embeddings is None:
            raise ValueError("the backbone has no input embedding: pass a transformers model")
        param = next(backbone.parameters())
        self.head = nn.Linear(embeddings.embedding_dim, 1, device=param.device, dtype=param.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        config = getattr(backbone, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        self.max_length = max_length or (int(context) if context else None)
        self.eval()  # no dropout when scoring; fit_reward_model switches to train mode

    @classmethod
    def from_causal_lm(
        cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
    ) -> "RewardModel":
        """A reward model on a causal LM's backbone (its ``base_model``; not copied)."""
        return cls(model.base_model, tokenizer, **kwargs)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _encode(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[Tensor, Tensor]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        _check_utf8(texts)
        eos = self.tokenizer.eos_token_id
        rows = []
        for i, text in enumerate(texts):
            ids = list(self.tokenizer(text).input_ids) + ([int(eos)] if eos is not None else [])
            ids = ids or [start_token_id(self.tokenizer)]
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"text {i} ({_preview(texts[i])}) has {len(ids)} tokens, more than the "
                    f"reward model's max_length of {self.max_length}: shorten it"
                )
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        batch = torch.full((len(rows), width), int(pad if pad is not None else 0), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):  # right padding: the last real token is at len - 1
            batch[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return batch.to(self.device), mask.to(self.device)

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        """The score of each text, with gradient (float32, on the model's device).

        Raises:
            ValueError: the lists differ in length or are empty, a text is not
                valid Unicode, or a text is longer than ``max_length``.
        """
        if len(prompts) != len(completions) or not prompts:
            raise ValueError(
                f"got {len(prompts)} prompts and {len(completions)} completions; "
                "pass one prompt per completion (and at least one)"
            )
        ids, mask = self._encode(prompts, completions)
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        last = mask.sum(dim=1) - 1
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(final.to(self.head.weight.dtype)).squeeze(-1).float()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Float[Tensor, " B"]:
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    self.scores(
                        prompts[i : i + self.batch_size], completions[i : i + self.batch_size]
                    )
                    for i in range(0, len(prompts), self.batch_size)
                ]
        finally:
            self.train(was_training)
        return torch.cat(chunks).cpu().clone()  # clone: usable outside inference mode

    def save(self, folder: str | Path) -> None:
        """Write the trainable weights (the head, and the backbone's parameters that
        require grad: all of them, or a LoRA adapter's) to ``folder/reward_model.pt``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.named_parameters() if v.requires_grad}
        data = _tensor_bytes({k: v.detach().cpu() for k, v in state.items()})
        partial = folder / "reward_model.pt.partial"
        write_bytes(partial, data)
        partial.replace(folder / "reward_model.pt")

    def load(self, folder: str | Path) -> "RewardModel":
        """Load weights written by :meth:`save` into this (same-architecture) model.

        Raises:
            ValueError: the file's keys or shapes do not match this model, or a
                weight is not finite.
        """
        path = Path(folder) / "reward_model.pt"
        state = torch.load(path, map_location=self.device, weights_only=True)
        own = dict(self.named_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown or "head.weight" not in state:
            raise ValueError(f"{path} does not fit this reward model (keys {unknown[:5]} ...)")
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{path}: {key} holds NaN or infinite values")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        return self


def _tensor_bytes(state: dict[str, Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _batches(
    pairs: Sequence[Preference], size: int, rng: random.Random
) -> Iterator[list[Preference]]:
    order = list(range(len(pairs)))
    rng.shuffle(order)
    for start in range(0, len(order), size):
        yield [pairs[i] for i in order[start : start + size]]


def _pair_scores(model: RewardModel, batch: Sequence[Preference]) -> tuple[Tensor, Tensor]:
    prompts = [p.prompt for p in batch]
    both = model.scores(
        [*prompts, *prompts], [p.chosen for p in batch] + [p.rejected for p in batch]
    )
    return both[: len(batch)], both[len(batch) :]


def evaluate_reward_model(model: RewardModel, pairs: Sequence[Preference]) -> dict[str, float]:
    """Held-out loss and accuracy of ``model`` on ``pairs`` (no gradient).

    Returns:
        ``{"eval/loss", "eval/accuracy", "eval/score_mean"}``.
    """
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), model.batch_size):
            c, r = _pair_scores(model, pairs[start : start + model.batch_size])
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "eval/loss": float(KF.bradley_terry_loss(c, r)),
        "eval/accuracy": float(KF.preference_accuracy(c, r)),
        "eval/score_mean": float(torch.cat([c, r]).mean()),
    }


def _check_fit_settings(pairs: Sequence[Preference], epochs: int, batch_size: int) -> None:
    if not pairs:
        raise ValueError("no preference pairs to fit")
    check_count(epochs, name="epochs")
    check_count(batch_size, name="batch_size")


def _open_metrics(out_dir: str | Path | None) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        raise FileExistsError(
            f"{metrics} already holds a fit; choose a new out_dir or delete the folder"
        )
    metrics.write_text("")
    return metrics


def _fit_pairs(
    losses: Any,
    evaluate: Any,
    params: list[nn.Parameter],
    pairs: Sequence[Preference],
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    eval_pairs: Sequence[Preference] | None,
    max_grad_norm: float,
    seed: int,
    out_dir: str | Path | None,
    save: Any,
    progress: bool,
) -> list[Record]:
    """Shuffled minibatches for ``epochs``; one optimiser step each, logged as it
    happens; held-out metrics and ``save(out_dir / "model")`` after each epoch."""
    _check_fit_settings(pairs, epochs, batch_size)
    metrics_file = _open_metrics(out_dir)
    rng = random.Random(seed)
    history: list[Record] = []
    per_epoch = math.ceil(len(pairs) / batch_size)
    bar = tqdm(total=epochs * per_epoch, disable=not progress)
    for epoch in range(1, epochs + 1):
        for index, batch in enumerate(_batches(pairs, batch_size, rng)):
            optimizer.zero_grad(set_to_none=True)
            loss, extra = losses(batch)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"the loss is {float(loss.detach())} at step {len(history) + 1}: lower the "
                    "learning rate, or check the pairs and the model for NaN"
                )
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            record = {"step": len(history) + 1, "epoch": epoch, "loss": float(loss.detach())}
            record |= {"grad_norm": float(grad_norm), **extra}
            if eval_pairs and index == per_epoch - 1:
                record |= evaluate(eval_pairs)
            history.append(record)
            _append(metrics_file, record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if out_dir is not None:
            save(Path(out_dir) / "model")
    bar.close()
    return history


def _append(path: Path | None, record: Record) -> None:
    if path is None:
        return
    try:
        with path.open("a") as handle:
            handle.write(strict_json(record) + "\n")
    except OSError as error:
        raise io_error(error, path, "append to") from error


def _reward_model_losses(model: RewardModel, centring: float) -> Any:
    def losses(batch: Sequence[Preference]) -> tuple[Tensor, dict[str, float]]:
        chosen, rejected = _pair_scores(model, batch)
        loss = KF.bradley_terry_loss(chosen, rejected, centring=centring)
        return loss, {
            "accuracy": float(KF.preference_accuracy(chosen.detach(), rejected.detach())),
            "score_mean": float(torch.cat([chosen, rejected]).detach().mean()),
        }

    return losses


def fit_reward_model(
    model: RewardModel,
    pairs: Sequence[Preference],
    *,
    eval_pairs: Sequence[Preference] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 8,
    centring: float = 0.01,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Record]:
    """Fit a reward model to preference pairs with the Bradley–Terry loss.

    Each step scores the chosen and rejected texts of a shuffled minibatch of
    pairs, takes :func:`kltune.functional.bradley_terry_loss` (with reward
    centring), clips the gradient norm and steps the optimiser. After each
    epoch the held-out pairs are scored and the weights are saved.

    Args:
        model: the reward model (its trainable parameters are fitted).
        pairs: training pairs.
        eval_pairs: held-out pairs, scored after each epoch.
        optimizer: defaults to AdamW over the trainable parameters at ``lr``.
        lr: the default optimiser's learning rate.
        epochs: passes over ``pairs``.
        batch_size: pairs per step.
        centring: weight of the reward-centring term (0 to switch it off).
        max_grad_norm: gradient-norm clipping.
        seed: seeds the shuffling.
        out_dir: if given, ``metrics.jsonl`` (one line per step) and the weights
            (``model/reward_model.pt``, rewritten after each epoch; load them with
            :meth:`RewardModel.load`) are written there.
        progress: show a progress bar.

    Returns:
        One record per step: ``step``, ``epoch``, ``loss``, ``grad_norm``,
        ``accuracy``, ``score_mean``, and on each epoch's last step
        ``eval/loss``, ``eval/accuracy``, ``eval/score_mean``.

    Raises:
        ValueError: no pairs, or ``epochs`` / ``batch_size`` < 1.
        FileExistsError: ``out_dir`` already holds a fit's metrics.
        FloatingPointError: the loss became NaN or infinite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr)
    model.train()
    try:
        return _fit_pairs(
            _reward_model_losses(model, centring),
            lambda held_out: evaluate_reward_model(model, held_out),
            params,
            pairs,
            optimizer=optimizer,
            epochs=epochs,
            batch_size=batch_size,
            eval_pairs=eval_pairs,
            max_grad_norm=max_grad_norm,
            seed=seed,
            out_dir=out_dir,
            save=model.save,
            progress=progress,
        )
    finally:
        model.eval()


def _sequence_logprobs(
    policy: Policy, reference: Reference, batch: Sequence[Preference]
) -> tuple[Tensor, Tensor]:
    """Sequence logprobs of chosen then rejected completions: policy's (with
    gradient) and reference's, each [2B]."""
    prompts = [p.prompt for p in batch]
    rollout = teacher_forced(
        policy, [*prompts, *prompts], [p.chosen for p in batch] + [p.rejected for p in batch]
    )
    logprobs = policy.score(rollout).logprobs
    with torch.no_grad():
        ref_logprobs = reference.logprobs(rollout)
    mask = rollout.response_mask
    return KF.masked_sum(logprobs, mask, dim=-1), KF.masked_sum(ref_logprobs, mask, dim=-1)


def dpo_losses(
    policy: Policy, reference: Reference, batch: Sequence[Preference], *, beta: float
) -> tuple[Float[Tensor, ""], dict[str, float]]:
    """The DPO loss of a batch of pairs (with gradient) and its metrics.

    Returns:
        The loss, and ``accuracy`` (the implicit reward ranks the pair right),
        ``reward_margin`` (mean implicit chosen minus rejected reward),
        ``logprob_chosen`` and ``logprob_rejected`` (the policy's mean sequence
        logprobs).
    """
    logprobs, ref_logprobs = _sequence_logprobs(policy, reference, batch)
    n = len(batch)
    loss = KF.dpo_loss(logprobs[:n], logprobs[n:], ref_logprobs[:n], ref_logprobs[n:], beta=beta)
    rewards = KF.dpo_implicit_rewards(logprobs.detach(), ref_logprobs, beta=beta)
    return loss, {
        "accuracy": float(KF.preference_accuracy(rewards[:n], rewards[n:])),
        "reward_margin": float((rewards[:n] - rewards[n:]).mean()),
        "logprob_chosen": float(logprobs[:n].detach().mean()),
        "logprob_rejected": float(logprobs[n:].detach().mean()),
    }


def dpo_step(
    policy: Policy,
    reference: Reference,
    batch: Sequence[Preference],
    optimizer: torch.optim.Optimizer,
    *,
    beta: float = 0.1,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One DPO update of ``policy`` on ``batch``: loss, backward, clip, step.

    Returns:
        ``loss``, ``grad_norm`` and the metrics of :func:`dpo_losses`.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = dpo_losses(policy, reference, batch, beta=beta)
    loss.backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics}


def _dpo_evaluation(policy: Policy, reference: Reference, beta: float, batch_size: int) -> Any:
    def evaluate(pairs: Sequence[Preference]) -> dict[str, float]:
        totals: dict[str, float] = {}
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                loss, metrics = dpo_losses(policy, reference, batch, beta=beta)
                for key, value in {"loss": float(loss), **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value * len(batch)
        return {f"eval/{k}": v / len(pairs) for k, v in totals.items()}

    return evaluate


def fit_dpo(
    policy: Policy,
    reference: Reference,
    pairs: Sequence[Preference],
    *,
    beta: float = 0.1,
    eval_pairs: Sequence[Preference] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-6,
    epochs: int = 1,
    batch_size: int = 8,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Record]:
    """Train ``policy`` on preference pairs with DPO (no reward model, no sampling).

    The same minibatch loop as :func:`fit_reward_model`, with
    :func:`kltune.functional.dpo_loss` of the policy's and the reference's
    sequence logprobs of each pair.

    Args:
        policy: the policy to train (a :class:`~kltune.policy.Policy`).
        reference: π_ref, e.g. :class:`~kltune.reference.FrozenReference` of the policy
            before training.
        pairs: training pairs.
        beta: DPO's β: the KL weight of the objective it optimises.
        eval_pairs: held-out pairs, scored after each epoch (``eval/accuracy`` is
            the implicit reward's accuracy on them).
        optimizer: defaults to Adam over the trainable parameters at ``lr``.
        lr, epochs, batch_size, max_grad_norm, seed, progress: as in
            :func:`fit_reward_model`.
        out_dir: if given, ``metrics.jsonl`` is written there, one line per step.

    Returns:
        One record per step: ``step``, ``epoch``, ``loss``, ``grad_norm`` and the
        metrics of :func:`dpo_losses`, with ``eval/...`` on each epoch's last step.

    Raises:
        ValueError: no pairs, ``epochs`` / ``batch_size`` < 1, ``beta`` <= 0, or a
            pair longer than the policy's context.
        FileExistsError: ``out_dir`` already holds a fit's metrics.
        FloatingPointError: the loss became NaN or infinite.
    """
    KF.dpo_implicit_rewards(torch.zeros(1), torch.zeros(1), beta=beta)  # validates beta
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)

    def losses(batch: Sequence[Preference]) -> tuple[Tensor, dict[str, float]]:
        return dpo_losses(policy, reference, batch, beta=beta)

    return _fit_pairs(
        losses,
        _dpo_evaluation(policy, reference, beta, batch_size),
        params,
        pairs,
        optimizer=optimizer,
        epochs=epochs,
        batch_size=batch_size,
        eval_pairs=eval_pairs,
        max_grad_norm=max_grad_norm,
        seed=seed,
        out_dir=out_dir,
        save=lambda folder: None,
        progress=progress,
    )
