"""The training-only dense encoder loss of the built-in DETR: which cell answers for which object."""
import pytest
import torch

from dynsparse.detection.encoder_aux import EncoderDenseHead, cell_targets


def test_each_object_is_assigned_to_the_cell_holding_its_centre_and_the_smaller_wins_a_shared_cell():
    targets = [
        {"class_labels": torch.tensor([2, 0, 1]),
         "boxes": torch.tensor([[0.10, 0.10, 0.1, 0.1],    # cell (0, 0)
                                [0.90, 0.60, 0.3, 0.3],    # cell (2, 3): large ...
                                [0.95, 0.70, 0.05, 0.05]])},  # ... and small, same cell
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    labels, boxes = cell_targets(targets, 4, 4, num_labels=3)
    assert labels.shape == (2, 16)
    expected = torch.full((16,), 3)
    expected[0], expected[2 * 4 + 3] = 2, 1
    assert torch.equal(labels[0], expected)
    assert torch.equal(boxes[0, 11], targets[0]["boxes"][2])
    assert (labels[1] == 3).all() and (boxes[1] == 0).all()


def test_loss_is_finite_trains_and_names_a_non_square_map():
    torch.manual_seed(0)
    head = EncoderDenseHead(8, num_labels=2)
    memory = torch.randn(2, 16, 8, requires_grad=True)
    targets = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}] * 2
    opt = torch.optim.Adam([memory, *head.parameters()], lr=0.05)
    first = None
    for _ in range(30):
        loss = head.loss(memory, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="square"):
        head.loss(torch.randn(1, 12, 8), targets[:1])
