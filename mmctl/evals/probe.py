"""A linear probe: how much of a scene a frozen ViT's features hold, read by the simplest possible reader.

Fresh built-in shapes scenes go through the encoder (the layer the projector reads); a linear classifier per
label — each occupied cell's colour and kind, the count — is fitted on some scenes' features and scored on
others (Alain & Bengio 2016). What a linear probe cannot read, the VLM rarely answers: a VLM often uses less
than its encoder holds (Fu et al. 2025), so align-vision reports both. A random frozen ViT is the baseline a
trained encoder must beat. Scores are on occupied cells (an empty cell is the easy majority: 7 of 9 on average).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def probe(vision, feature_layer: int, size: int, train: int = 2000, test: int = 1000, seed: int = 0) -> dict:
    """Held-out accuracy of linear classifiers on the frozen encoder's features: cell colour, cell shape, count."""
    from mmctl.data import vqa
    from mmctl.data.shapes import COLOURS, KINDS, MOST, labels
    from mmctl.models.cells import pool

    examples = vqa.shapes(train + test, 7_000_003 + seed, "train", size)  # a seed no training source uses
    y = torch.tensor([labels(e.scene) for e in examples])
    was_training = vision.training
    vision.eval()
    with torch.no_grad():
        device = next(vision.parameters()).device
        feats = [vision.features(torch.stack([e.pixels for e in examples[i:i + 256]]).to(device), feature_layer)
                 for i in range(0, len(examples), 256)]
    vision.train(was_training)
    cells, whole = pool(torch.cat(feats).float().cpu())
    tr, te = slice(0, train), slice(train, None)
    occupied = y[te, :9].flatten() > 0
    colour = _fit(cells[tr].flatten(0, 1), y[tr, :9].flatten(), cells[te].flatten(0, 1), len(COLOURS) + 1)
    kind = _fit(cells[tr].flatten(0, 1), y[tr, 9:18].flatten(), cells[te].flatten(0, 1), len(KINDS) + 1)
    count = _fit(whole[tr], y[tr, 18], whole[te], MOST)
    return {"cell_colour": float((colour == y[te, :9].flatten())[occupied].float().mean()),
            "cell_shape": float((kind == y[te, 9:18].flatten())[occupied].float().mean()),
            "count": float((count == y[te, 18]).float().mean()), "train_images": train, "test_images": test}


def _fit(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.Tensor:
    """Multinomial logistic regression (features standardised on the training set, L-BFGS): test predictions."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (x_test @ w + b).argmax(1)
