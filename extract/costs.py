"""Per-exit inference cost IC^l in Mul-Adds (paper, appendix 9.2), counted the way the paper counted it.

    python pipeline.py costs --backbone t2t_vit_14 --num-classes 100 --img-size 224 --json

IC^l = sum over k <= l of Mul-Add(h^k) + Mul-Add(f^k) + Mul-Add(g^k)            (eq. 18)
- h^k, the backbone up to exit k: measured with the fvcore-style counter of extract/macs.py on one image, by
  running the ExitBackbone's own pieces (stem, blocks, the final norm + head at the last exit), plus the
  representation each passed exit reads (for T2T-ViT the final norm of the CLS token: 5 * D);
- f^k, the IM Linear(D_k, K): D*K + K, the authors' counting (Tables 2-3: +2570 per exit for D=256, K=10);
- g^k, the gate: gate_macs(K) = 9K + 6 (Tables 2-3: +96 for K=10, +906 for K=100).
The last exit uses the backbone's own head, so it adds no IM or gate of its own.

At 224 px this gives T2T-ViT-7 1156 M and T2T-ViT-14 4800 M Mul-Adds for the full network against the paper's
1158 M and 4805 M; every exit of both tables agrees within 0.2% (tests/test_costs.py). The remaining gap is the
authors' exit code normalising all tokens before taking the CLS token (5 * N * D per exit, about 0.25 M for
T2T-ViT-7), where an IM only needs the CLS token.
"""
import torch

from .backbones import load_backbone
from .macs import MacCounter

__all__ = ["exit_backbone_macs", "im_macs", "gate_macs", "cumulative_total_macs", "exit_costs", "backbone_costs",
           "format_costs"]


@torch.no_grad()
def exit_backbone_macs(backbone) -> list[dict]:
    """Per exit l (1-based): {"exit", "name", "cumulative_backbone_macs", "represent_macs"}.

    cumulative_backbone_macs = stem + blocks 1..l, and for the last exit also what `classify` runs (final norm and
    head). represent_macs = what `represent(l)` adds (read by exit l's IM; not part of the last exit's cost).
    """
    backbone.eval()
    x = torch.zeros(1, 3, backbone.img_size, backbone.img_size)
    with MacCounter() as counter:
        state = backbone.stem(x)
    cumulative = counter.total
    exits = []
    for l, name in enumerate(backbone.exit_names):
        with MacCounter() as counter:
            state = backbone.block(l, state)
        cumulative += counter.total
        with MacCounter() as represent:
            backbone.represent(l, state)
        exits.append({"exit": l + 1, "name": name, "cumulative_backbone_macs": cumulative,
                      "represent_macs": represent.total})
    with MacCounter() as counter:
        backbone.classify(state)
    exits[-1]["cumulative_backbone_macs"] += counter.total
    return exits


def im_macs(dim: int, num_classes: int) -> int:
    """An IM, Linear(D, K): D*K multiply-adds and K bias additions, as the paper's Tables 2-3 count it."""
    return dim * num_classes + num_classes


def gate_macs(num_classes: int) -> int:
    """A gate over the IM's softmax, as the authors count it (their LearnableUncGate.get_flops):
    max probability K comparisons + top-1/top-2 margin K + 1 + entropy 2K + entropy of the tempered softmax 5K,
    then Linear(4, 1) 4 + 1. Total 9K + 6: 96 for K=10 and 906 for K=100, the figures of Tables 2-3."""
    return 9 * num_classes + 6


def cumulative_total_macs(exits: list[dict], exit_dims, num_classes: int) -> list[int]:
    """IC^l of eq. 18 for every exit: backbone up to l plus (representation + IM + gate) of every exit k <= l
    that has an IM; the last exit has the backbone's head instead (counted in its backbone figure)."""
    totals, branches = [], 0
    last = len(exits) - 1
    for l, (e, dim) in enumerate(zip(exits, exit_dims)):
        if l < last:
            branches += e["represent_macs"] + im_macs(dim, num_classes) + gate_macs(num_classes)
        totals.append(e["cumulative_backbone_macs"] + branches)
    return totals


def exit_costs(backbone) -> list[dict]:
    """Everything the cache manifest records per exit: exit, name, dim, cumulative_backbone_macs,
    represent_macs, cumulative_total_macs."""
    exits = exit_backbone_macs(backbone)
    totals = cumulative_total_macs(exits, backbone.exit_dims, backbone.num_classes)
    return [dict(e, dim=dim, cumulative_total_macs=total)
            for e, dim, total in zip(exits, backbone.exit_dims, totals)]


def backbone_costs(name: str, num_classes: int, img_size: int | None = None, tokens: str = "cls") -> dict:
    """The `costs --json` object for a randomly initialised backbone (weights do not change the count)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone = load_backbone(name, weights=None, num_classes=num_classes, img_size=img_size, tokens=tokens)
    return {"backbone": name, "img_size": backbone.img_size, "num_classes": num_classes, "tokens": tokens,
            "exits": exit_costs(backbone)}


def format_costs(costs: dict) -> str:
    """A readable table of a backbone_costs() object (Mul-Adds in millions)."""
    lines = [f"{costs['backbone']}  {costs['img_size']} px  K={costs['num_classes']}  (Mul-Adds, fvcore counting)",
             f"{'exit':>4}  {'name':<12} {'dim':>5}  {'backbone':>12}  {'with IMs+gates':>14}  {'of full':>7}"]
    full = costs["exits"][-1]["cumulative_total_macs"]
    for e in costs["exits"]:
        lines.append(f"{e['exit']:>4}  {e['name']:<12} {e['dim']:>5}  {e['cumulative_backbone_macs'] / 1e6:>11.2f}M"
                     f"  {e['cumulative_total_macs'] / 1e6:>13.2f}M  {e['cumulative_total_macs'] / full:>7.1%}")
    return "\n".join(lines)
