"""The central mask builder: masks, labels, token types and positions around N virtual tokens."""

from __future__ import annotations

import torch

from peftkit import masks

LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_virtual_tokens_are_always_attendable_and_padding_stays_masked():
    for mask in (LEFT, RIGHT, LEFT.bool()):
        extended = masks.extend_attention_mask(mask, 3)
        assert extended.shape == (2, 8) and extended.dtype == mask.dtype
        assert extended[:, :3].all()
        assert torch.equal(extended[:, 3:], mask)


def test_labels_get_ignored_virtual_positions():
    labels = torch.tensor([[5, 6, -100], [7, 8, 9]])
    extended = masks.extend_labels(labels, 2)
    assert extended.tolist() == [[-100, -100, 5, 6, -100], [-100, -100, 7, 8, 9]]


def test_only_per_token_integer_labels_are_token_labels():
    assert masks.is_token_labels(torch.zeros(2, 5, dtype=torch.long), 2, 5)
    assert not masks.is_token_labels(torch.tensor([0, 1]), 2, 5)                # sequence classes
    assert not masks.is_token_labels(torch.zeros(2, 5), 2, 5)                   # float multi-label
    assert not masks.is_token_labels(torch.zeros(2, 3, dtype=torch.long), 2, 5)  # another length


def test_token_types_of_virtual_tokens_are_the_first_segment():
    types = torch.tensor([[0, 1, 1]])
    assert masks.extend_token_type_ids(types, 2).tolist() == [[0, 0, 0, 1, 1]]


def test_positions_place_a_padded_row_as_if_alone():
    assert masks.position_ids(LEFT, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert masks.position_ids(RIGHT, 5)[0, :3].tolist() == [0, 1, 2]
    # Behind N virtual tokens the real tokens start at N, whatever padding precedes them.
    extended = masks.extend_attention_mask(LEFT, 3)
    assert masks.position_ids(extended, 5).tolist() == [[2, 2, 3, 4, 5], [3, 4, 5, 6, 7]]
    # A decoding step: only the last column's position.
    grown = torch.cat([extended, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert masks.position_ids(grown, 1).tolist() == [[6], [8]]


def test_caller_positions_are_moved_behind_the_virtual_tokens():
    given = torch.tensor([[0, 1, 2]])
    assert masks.shift_position_ids(given, 2).tolist() == [[2, 3, 4]]
    assert masks.extend_position_ids(given, 2).tolist() == [[0, 1, 2, 3, 4]]


def test_full_mask():
    assert masks.full_mask(2, 3, torch.device("cpu")).tolist() == [[1, 1, 1], [1, 1, 1]]
