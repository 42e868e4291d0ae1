"""The distillation objective: what it measures, how it averages, and that gradient accumulation is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from early_exit.training import exit_distillation_loss, exit_weights


def _batch(seed, batch=3, seq=7, vocab=11, exits=2):
    generator = torch.Generator().manual_seed(seed)
    final = torch.randn(batch, seq, vocab, generator=generator) * 2
    heads = [torch.randn(batch, seq, vocab, generator=generator) for _ in range(exits)]
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, :3] = False  # left padding on one row
    mask[2, :5] = False
    return heads, final, mask


def test_the_loss_is_the_token_mean_of_kl_from_the_final_layer():
    heads, final, mask = _batch(0)
    weights = [0.25, 0.75]
    expected = (
        sum(
            weight * F.kl_div(head[mask].log_softmax(-1), final[mask].log_softmax(-1), log_target=True, reduction="sum")
            for weight, head in zip(weights, heads)
        )
        / mask.sum()
    )
    torch.testing.assert_close(exit_distillation_loss(heads, final, mask, weights), expected)


def test_an_exit_that_matches_the_final_layer_costs_nothing():
    _, final, mask = _batch(1)
    assert exit_distillation_loss([final.clone()], final, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert exit_distillation_loss([final.clone()], final, mask, top_k=11).item() == pytest.approx(0.0, abs=1e-6)
    # With fewer kept tokens the target is the truncated teacher: matching the untruncated one costs -log(kept mass).
    kept_mass = final[mask].softmax(-1).topk(4, dim=-1).values.sum(-1)
    torch.testing.assert_close(exit_distillation_loss([final.clone()], final, mask, top_k=4), -kept_mass.log().mean())


def test_padded_tokens_do_not_count():
    heads, final, mask = _batch(2)
    noisy = [head.clone() for head in heads]
    for head in noisy:
        head[~mask] = 1e4  # anything at padding must not matter
    torch.testing.assert_close(exit_distillation_loss(noisy, final, mask), exit_distillation_loss(heads, final, mask))


def test_temperature_scales_by_its_square():
    heads, final, mask = _batch(3)
    soft = exit_distillation_loss(heads, final, mask, temperature=2.0)
    manual = exit_distillation_loss([head / 2 for head in heads], final / 2, mask) * 4
    torch.testing.assert_close(soft, manual)


def test_top_k_scores_the_exit_on_the_teachers_top_tokens():
    heads, final, mask = _batch(4, exits=1)
    teacher, indices = final[mask].topk(3, dim=-1)
    teacher_log = teacher.log_softmax(-1)
    student_log = heads[0][mask].log_softmax(-1).gather(-1, indices)
    expected = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()
    torch.testing.assert_close(exit_distillation_loss(heads, final, mask, top_k=3), expected)


def test_only_the_exits_receive_gradient():
    heads, final, mask = _batch(5)
    final.requires_grad_(True)
    heads = [head.requires_grad_(True) for head in heads]
    exit_distillation_loss(heads, final, mask).backward()
    assert final.grad is None
    assert all(head.grad is not None and head.grad[mask].abs().sum() > 0 for head in heads)
    assert all(head.grad[~mask].abs().sum() == 0 for head in heads)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 3), lengths=st.lists(st.integers(1, 7), min_size=4, max_size=4))
def test_micro_batches_sum_to_the_loss_of_the_whole_batch(seed, cut, lengths):
    """With Trainer's num_items_in_batch, gradient accumulation over ragged micro-batches is exact."""
    heads, final, _ = _batch(seed, batch=4)
    mask = torch.arange(7).expand(4, 7) >= 7 - torch.tensor(lengths)[:, None]  # rows of different lengths
    whole = exit_distillation_loss(heads, final, mask)
    total_tokens = mask.sum()
    parts = [slice(0, cut), slice(cut, 4)]
    accumulated = sum(
        exit_distillation_loss([head[part] for head in heads], final[part], mask[part], num_items_in_batch=total_tokens)
        for part in parts
    )
    torch.testing.assert_close(accumulated, whole)


def test_exit_weights():
    assert exit_weights([6, 12, 18]) == pytest.approx([1 / 3] * 3)
    assert exit_weights([6, 12, 18], "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert exit_weights([6, 12], [1, 3]) == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="uniform"):
        exit_weights([6], "quadratic")
    with pytest.raises(ValueError, match="one per exit"):
        exit_weights([6, 12], [1.0])


def test_bad_arguments_are_named():
    heads, final, mask = _batch(6)
    with pytest.raises(ValueError, match="temperature"):
        exit_distillation_loss(heads, final, mask, temperature=0)
    with pytest.raises(ValueError, match="3 weights for 2 exits"):
        exit_distillation_loss(heads, final, mask, weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="top_k must be between 1 and the vocabulary size 11, got 12"):
        exit_distillation_loss(heads, final, mask, top_k=12)
