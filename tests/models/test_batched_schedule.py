"""A stacked user's schedule: train()'s batches, in train()'s order, as one padded tensor."""

from __future__ import annotations

import torch

from pollinate.models.batched import _schedule


def test_each_epoch_is_the_permutation_train_draws_cut_into_batches() -> None:
    steps = _schedule(23, 2, 10, torch.Generator().manual_seed(5))
    assert steps.shape == (6, 10)  # ceil(23 / 10) = 3 steps an epoch
    same = torch.Generator().manual_seed(5)
    for epoch in range(2):
        order = torch.randperm(23, generator=same)  # train()'s draw for the epoch
        block = steps[3 * epoch : 3 * epoch + 3]
        assert torch.equal(block.flatten()[:23], order)
        assert (block.flatten()[23:] == -1).all()  # the short last batch is padded


def test_a_whole_dataset_batch_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    steps = _schedule(7, 3, 0, gen)  # batch <= 0: full batch
    assert torch.equal(steps, torch.arange(7).repeat(3, 1))
    assert torch.equal(gen.get_state(), before)


def test_nothing_to_train_is_no_step() -> None:
    assert len(_schedule(0, 2, 10, None)) == 0
    assert len(_schedule(9, 0, 10, None)) == 0
