"""Mul-Add counting (fvcore conventions) on hand-computable modules, and the paper's per-exit T2T-ViT costs."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import extract  # noqa: F401  (before timm)
from extract.backbones import load_backbone
from extract.costs import (backbone_costs, cumulative_total_macs, exit_backbone_macs, exit_costs, format_costs,
                           gate_macs, im_macs)
from extract.macs import MacCounter, count_macs

# Appendix 9.2, Table 2 (T2T-ViT-7, CIFAR-10) and Table 3 (T2T-ViT-14, CIFAR-100), 224 px, millions of Mul-Adds:
# the backbone row and the JEI-DNN row (backbone + IMs + gates of the exits passed).
PAPER = {
    "t2t_vit_7": dict(num_classes=10, dim=256,
                      backbone=[414.3, 538.2, 662.1, 786, 909.9, 1034, 1158],
                      total=[414.3, 538.2, 662.1, 786, 909.9, 1034, 1158]),
    "t2t_vit_14": dict(num_classes=100, dim=384,
                       backbone=[626.2, 947.7, 1269, 1590, 1912, 2233, 2555, 2876, 3198, 3519, 3841, 4162, 4483,
                                 4805],
                       total=[626.3, 947.7, 1269, 1591, 1912, 2233, 2555, 2876, 3198, 3519, 3841, 4162, 4483,
                              4805]),
}


# ---- the counter ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, x, expected", [
    (nn.Linear(16, 8), torch.zeros(1, 5, 16), 5 * 16 * 8),                          # bias add not counted
    (nn.Linear(16, 8, bias=False), torch.zeros(2, 16), 2 * 16 * 8),
    (nn.Conv2d(3, 8, 3, padding=1), torch.zeros(1, 3, 10, 10), 8 * 3 * 9 * 10 * 10),
    (nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), torch.zeros(1, 8, 10, 10), 8 * 1 * 9 * 5 * 5),
    (nn.Conv2d(8, 4, 1, groups=2), torch.zeros(1, 8, 6, 6), 4 * 4 * 1 * 36),
    (nn.LayerNorm(16), torch.zeros(1, 5, 16), 5 * 5 * 16),
    (nn.LayerNorm(16, elementwise_affine=False), torch.zeros(1, 5, 16), 4 * 5 * 16),
    (nn.GroupNorm(2, 8), torch.zeros(1, 8, 4, 4), 5 * 8 * 16),
    (nn.BatchNorm2d(8).eval(), torch.zeros(1, 8, 4, 4), 2 * 8 * 16),               # fvcore: eval-mode BN is 2
    (nn.AdaptiveAvgPool2d(1), torch.zeros(1, 8, 4, 4), 8 * 16),
    (nn.AdaptiveAvgPool2d(2), torch.zeros(1, 8, 4, 4), 8 * 16),
    (nn.Upsample(scale_factor=2, mode="nearest"), torch.zeros(1, 2, 3, 3), 2 * 6 * 6),
    (nn.Upsample(scale_factor=2, mode="bilinear"), torch.zeros(1, 2, 3, 3), 4 * 2 * 6 * 6),
    (nn.Sequential(nn.GELU(), nn.Softmax(-1), nn.Dropout()), torch.zeros(1, 5, 16), 0),  # element-wise: free
])
def test_counter_on_hand_computable_modules(module, x, expected):
    assert count_macs(module, x) == expected


def test_counter_on_products_and_attention():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
    explicit = 2 * 5 * 7 * 4 + 2 * 5 * 7 * 3                                    # q k^T, then attn v
    assert count_macs(lambda: (q @ k.transpose(-2, -1)).softmax(-1) @ v) == explicit
    assert count_macs(F.scaled_dot_product_attention, q, k, v) == explicit      # math path (bmm's)
    v4 = torch.randn(1, 2, 7, 4)                                                 # equal head dims: fused kernel
    assert count_macs(F.scaled_dot_product_attention, q, k, v4) == 2 * 2 * 5 * 7 * 4
    x, w = torch.randn(1, 6, 5), torch.randn(3, 5)
    assert count_macs(torch.einsum, "bti,mi->btm", x, w) == 6 * 5 * 3
    assert count_macs(torch.einsum, "bti,bi->bt", x, torch.randn(1, 5)) == 6 * 5
    assert count_macs(torch.matmul, torch.randn(4, 5), torch.randn(5)) == 20


def test_counter_reports_per_op():
    with torch.no_grad(), MacCounter() as counter:
        nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))(torch.zeros(2, 4))
    assert counter.by_op == {"addmm": 2 * 4 * 3, "native_layer_norm": 5 * 6}
    assert counter.total == 24 + 30


# ---- exit costs ------------------------------------------------------------------------------------------------

def test_im_and_gate_figures_of_tables_2_and_3():
    assert im_macs(256, 10) == 2570 and im_macs(384, 100) == 38_500
    assert gate_macs(10) == 96 and gate_macs(100) == 906


def test_cumulative_total_adds_the_branches_of_exits_passed():
    exits = [{"cumulative_backbone_macs": c, "represent_macs": 3} for c in (100, 200, 300)]
    branch = 3 + (4 * 2 + 2) + (9 * 2 + 6)
    assert cumulative_total_macs(exits, [4, 4, 4], 2) == [100 + branch, 200 + 2 * branch, 300 + 2 * branch]


def test_exit_pieces_add_up_to_the_whole_model():
    backbone = load_backbone("t2t_vit_7", num_classes=10, img_size=32, embed_dim=32, depth=3, num_heads=2)
    exits = exit_backbone_macs(backbone)
    assert [e["exit"] for e in exits] == [1, 2, 3]
    assert [e["represent_macs"] for e in exits] == [5 * 32] * 3                # final norm of the CLS token
    assert exits[-1]["cumulative_backbone_macs"] == count_macs(backbone.model, torch.zeros(1, 3, 32, 32))
    steps = [b["cumulative_backbone_macs"] - a["cumulative_backbone_macs"] for a, b in zip(exits, exits[1:])]
    assert steps[0] > 0 and len(set(steps[:-1])) == 1                           # identical blocks cost the same
    costs = exit_costs(backbone)
    assert [c["cumulative_total_macs"] for c in costs] == cumulative_total_macs(exits, [32] * 3, 10)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_t2t_costs_match_the_paper(name):
    paper = PAPER[name]
    costs = json.loads(json.dumps(backbone_costs(name, paper["num_classes"], 224)))  # JSON-able as is
    assert costs["backbone"] == name and costs["img_size"] == 224 and costs["num_classes"] == paper["num_classes"]
    exits = costs["exits"]
    assert len(exits) == len(paper["backbone"])
    last = len(exits) - 1
    for l, e in enumerate(exits):
        assert e["exit"] == l + 1
        for ours, theirs in [(e["cumulative_backbone_macs"], paper["backbone"][l]),
                             (e["cumulative_total_macs"], paper["total"][l])]:
            assert abs(ours / 1e6 - theirs) / theirs < 0.005, (l + 1, ours / 1e6, theirs)
        # The IM and gate rows of the tables, exactly: one branch per exit passed, none for the last exit.
        passed = min(l + 1, last)
        branches = e["cumulative_total_macs"] - e["cumulative_backbone_macs"]
        represent = sum(x["represent_macs"] for x in exits[:passed])
        assert branches - represent == passed * (im_macs(paper["dim"], paper["num_classes"])
                                                 + gate_macs(paper["num_classes"]))
    assert "blocks.0" in format_costs(costs)


def test_bad_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        backbone_costs("t2t_vit_7", 0, 32)
