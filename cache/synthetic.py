"""A synthetic feature cache, written through cache.store's writer like an extraction: for tests, benchmarks and
trying stage two without a backbone.

    path = write_synthetic_cache("c.zarr", {"train": 2000, "val": 600, "test": 600}, n_exits=6, dim=64,
                                 num_classes=20)

Shaped like a T2T-ViT-14 cache (a CLS token per block, Mul-Adds growing per block as Table 3 of the paper gives
them) so that costs and exit rules behave as on the real one.
"""
from pathlib import Path

import numpy as np

from cache.store import create_or_resume

T2T14_BLOCK_MACS = 321.5e6    # Table 3: IC^l grows by ~321.5M Mul-Adds per block after 626.2M at block 1
T2T14_STEM_MACS = 304.7e6


def write_synthetic_cache(path, sizes: dict, n_exits: int, dim: int, num_classes: int, seed: int = 0,
                          chunk_rows: int = 256, head_is_task_head: bool = True) -> Path:
    """A complete cache written through cache.store's writer. Sample i of class y has representation
    s_il * mu_y + N(0, 1) at exit l, with class means mu_y ~ N(0, 16 I / dim) and a class signal s_il that grows
    with depth and arrives later for harder samples (a per-sample difficulty), so that early exits pay off for
    some samples only. The backbone head's logits are a linear read-out of the last representation (stored when
    head_is_task_head; otherwise stage two trains a last IM like the others)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, dim)).astype(np.float32) * (4.0 / np.sqrt(dim))
    depth = np.arange(1, n_exits + 1) / n_exits
    macs = [T2T14_STEM_MACS + T2T14_BLOCK_MACS * l for l in range(1, n_exits + 1)]
    manifest = {
        "backbone": "synthetic-t2t_vit_14", "weights": {"path": None, "sha256": None, "source": "synthetic"},
        "num_classes": num_classes, "img_size": 224, "tokens": "cls", "head_is_task_head": head_is_task_head,
        "exits": [{"exit": l + 1, "name": f"blocks.{l}", "dim": dim, "cumulative_backbone_macs": int(m),
                   "represent_macs": 0, "cumulative_total_macs": int(m)} for l, m in enumerate(macs)],
        "dataset": {"name": "synthetic", "seed": seed, "sizes": dict(sizes)},
    }
    layout = {"splits": dict(sizes), "exit_dims": [dim] * n_exits, "num_classes": num_classes,
              "with_logits": head_is_task_head, "chunk_rows": chunk_rows, "tokens": None}
    writer = create_or_resume(path, manifest, layout)
    for split, n in sizes.items():
        split_rng = np.random.default_rng([seed, list(sizes).index(split)])
        for i in writer.pending_chunks(split):
            lo, hi = writer.chunk_range(split, i)
            labels = split_rng.integers(0, num_classes, hi - lo)
            difficulty = split_rng.uniform(0.0, 1.0, hi - lo)
            # signal rises from ~0 to ~1 around depth = difficulty (a logistic ramp), plus a small base level
            signal = 0.15 + 1.0 / (1.0 + np.exp(-12.0 * (depth[None, :] - difficulty[:, None])))
            feats = [signal[:, l, None] * means[labels] + split_rng.standard_normal((hi - lo, dim))
                     .astype(np.float32) for l in range(n_exits)]
            logits = feats[-1] @ means.T * 3.0 if head_is_task_head else None
            writer.write_chunk(split, i, feats, labels, logits)
    return writer.finish()
