"""`cache info CACHE` (manifest, sizes on disk, exits with dims and Mul-Adds) and `cache verify CACHE`.

    python pipeline.py cache info cache/t2t_vit_14-cifar100-1a2b3c4d5e.zarr
    python pipeline.py cache verify cache/t2t_vit_14-cifar100-1a2b3c4d5e.zarr   # exit status 1 on any problem
    python pipeline.py cache verify --seal OLD.zarr   # adds chunk checksums to a format version 1 cache
"""
import json
from pathlib import Path

import click


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


@click.group("cache")
def cache_group():
    """Inspect and check feature caches."""


@cache_group.command("info")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info_cmd(cache, as_json):
    """Manifest summary, sizes on disk, and the exits with their dims and cumulative Mul-Adds."""
    from cache.store import CacheError, RawStore, staging_path
    if not cache.exists() and staging_path(cache).exists():
        cache = staging_path(cache)   # an HDF5 cache still being extracted: show its staging store
    try:
        store = RawStore(cache)
    except CacheError as err:
        raise click.ClickException(str(err)) from None
    store.close()
    m = store.attrs
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    layout, weights, data = m["layout"], m.get("weights") or {}, m.get("dataset") or {}
    click.echo(f"cache        {cache}  ({store.kind}, {_human(_disk_size(cache))} on disk)")
    click.echo(f"status       {'complete' if m.get('complete') else 'INCOMPLETE (rerun the extract command)'}")
    click.echo(f"fingerprint  {m['fingerprint']}")
    click.echo(f"backbone     {m['backbone']}  img_size={m['img_size']}  tokens={m['tokens']}  "
               f"precision={m.get('precision')}")
    sha = weights.get("sha256")
    click.echo(f"weights      {weights.get('source') or weights.get('path') or 'random init'}"
               + (f"  sha256={sha[:16]}..." if sha else ""))
    click.echo(f"dataset      {data.get('name')}  num_classes={m['num_classes']}  "
               f"logits={'yes' if layout['with_logits'] else 'no (head not the task head)'}")
    for split, n in layout["splits"].items():
        row_bytes = 2 * sum(layout["exit_dims"]) * (layout["tokens"] or 1) + 8 + 2 * m["num_classes"] * \
            layout["with_logits"]
        click.echo(f"  {split:<6} {n:>9} rows  {_human(n * row_bytes)} of arrays")
    click.echo(f"created      {m.get('created')}  versions: "
               + ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items())))
    exits = m["exits"]
    full = exits[-1].get("cumulative_total_macs") or 1
    click.echo(f"{'exit':>4}  {'name':<20} {'dim':>5}  {'backbone (M)':>12}  {'total (M)':>10}  {'fraction':>8}")
    for e in exits:
        total = e.get("cumulative_total_macs", 0)
        click.echo(f"{e['exit']:>4}  {e['name']:<20} {e['dim']:>5}  {e.get('cumulative_backbone_macs', 0) / 1e6:>12.2f}"
                   f"  {total / 1e6:>10.2f}  {total / full:>8.4f}")


@cache_group.command("verify")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--seal", is_flag=True, help="Add chunk checksums to a sound zarr cache of format version 1 "
              "(computed from its current content).")
def verify_cmd(cache, seal):
    """Complete flag, manifest, costs, every chunk written and matching its checksum, no NaN/Inf, labels in
    range; exit status 1 on any problem (a rerun of the extract command re-extracts bad chunks)."""
    from cache.verify import seal_cache, verify_cache
    problems = seal_cache(cache) if seal else verify_cache(cache)
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        raise click.exceptions.Exit(1)
    from cache.store import RawStore
    store = RawStore(cache)
    store.close()
    old = store.attrs.get("format_version", 0) < 2
    click.echo(f"ok: {cache}" + (" (format version 1: no chunk checksums to check; `cache verify --seal` adds "
                                 "them)" if old else ""))
