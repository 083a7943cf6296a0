"""`predict`: classify image files with a trained run, exiting early for real (heads/runtime.py).

    python pipeline.py predict --run RUN --lam 0.5 shoe.png shirt.png

One line per image: path, predicted class, exit taken / number of exits, calibrated max probability (temperature
fitted on V2) and the conformal set at --alpha. Images go through the cache's own eval transform (resize,
normalisation, grayscale handling exactly as the extraction did). At the end, on stderr: images per second of the
early-exit network (and with reading the files) and the Mul-Adds the exits taken saved against the full network.
"""
import time
from pathlib import Path

import click


@click.command("predict")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run directory written by train / sweep / fit.")
@click.option("--lam", type=float, required=True, help="Lambda: the run's selected model nearest to it (log scale).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Gate threshold: exit at the first l with P(E^l|x) above it (eq. 4).")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Conformal miscoverage of the sets.")
@click.option("--conformal", type=click.Choice(["general", "ims", "strict", "gated"]), default="gated",
              show_default=True, help="Conformal construction (appendix 9.3).")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None,
              help="Where the run's cache is now (default: the path the run recorded).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def predict_cmd(run_dir, lam, threshold, alpha, conformal, cache_path, batch_size, device, images):
    """Predict the class of IMAGE files with the early-exit network of a run."""
    import torch

    from heads.runtime import EarlyExitModel, RuntimeSettings, image_batch

    if batch_size < 1:
        raise click.UsageError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        settings = RuntimeSettings(threshold=threshold, alpha=alpha, conformal=conformal)
        model = EarlyExitModel.from_run(run_dir, lam, device=device, settings=settings, cache_path=cache_path)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    names = model.class_names or [str(k) for k in range(model.backbone.num_classes)]
    exits, network_s, start = [], 0.0, time.perf_counter()
    for lo in range(0, len(images), batch_size):
        paths = images[lo:lo + batch_size]
        try:
            x = image_batch(paths, model.manifest)
        except OSError as err:   # PIL: not an image, truncated file
            raise click.ClickException(f"cannot read an image of {', '.join(paths)}: {err}") from None
        x = x.to(device)
        begin = time.perf_counter()
        out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        network_s += time.perf_counter() - begin
        exits.extend(out.exit_index.tolist())
        for i, path in enumerate(paths):
            k = int(out.prediction[i])
            members = ", ".join(names[j] for j in out.sets[i].nonzero().flatten().tolist())
            click.echo(f"{path}\t{names[k]}\texit {int(out.exit_index[i]) + 1}/{model.num_exits}"
                       f"\tp={float(out.probs[i, k]):.3f}\tset={{{members}}}")
    click.echo(speed_summary(exits, network_s, time.perf_counter() - start, model.cumulative_macs), err=True)


def speed_summary(exits: list[int], network_s: float, total_s: float, cumulative_macs: list[float] | None) -> str:
    """One line: images/s of the early-exit network alone and with the files read, and the Mul-Add saving the
    exits taken realised (IC^l of each image's exit against IC^L)."""
    n = len(exits)
    line = (f"{n} images: {n / network_s:.1f} images/s in the early-exit network, {n / total_s:.1f} with reading "
            "the files")
    if cumulative_macs:
        mean = sum(cumulative_macs[e] for e in exits) / n
        full = cumulative_macs[-1]
        line += (f"; {mean / 1e6:.2f}M Mul-Adds per image, {mean / full:.3f} of the full network's {full / 1e6:.2f}M "
                 f"({full / mean:.2f}x fewer)")
    return line
