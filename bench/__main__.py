"""python -m bench: the benchmark report.

    python -m bench                 quick run: about 2 minutes on a 2-core CPU (127 s measured)
    python -m bench --full          the full sweep: about 10 minutes there (570 s measured)
    python -m bench --json PATH     also save the JSON (and its figure, PATH with .png) there

Run it from the repository root: bench/ is a folder of the repository, not an installed
package. Prints the tables and the targets, and always writes
bench/results/local/<device>-<date>.json (ignored by git) with a PNG figure beside it.
Sections: 1 memory, 2 decode attention (the Triton kernel against the reference on a GPU; one
attention layer absorbed / naive / transformers on any device, and its time over the time to
stream its bytes at the copy bandwidth measured in the run; one DeepSeek-V3.2 sparse layer
against the dense V3 layer, split into indexer and attention), 3 transformers generation
unpatched vs mla.hf.patch, 4 speculative decoding on the shipped small model, 5 the compiled
Triton kernels, 6 (--full only) MXFP4 compressed entries simulated on tiny DeepSeek-V4 models
(greedy tokens kept against the float32 cache, bytes at 1M tokens; bench/mxfp4.py).
"""

from __future__ import annotations

import argparse
import os

import torch

from .report import SECTIONS, Settings, default_path, run, save


def _default_threads() -> int:
    """The cores not already busy (1-minute load average): on a shared machine, more threads
    than idle cores make every timing a measurement of the scheduler."""
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--full", action="store_true", help="the full sweep (longer)")
    parser.add_argument("--json", metavar="PATH", help="also save the report JSON here (and the PNG beside it)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores idle at start)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or _default_threads())
    settings = Settings.full(device) if args.full else Settings.quick(device)
    threads = torch.get_num_threads()
    print(f"mla-latent benchmark on {device} ({'full' if args.full else 'quick'}; "
          f"{threads} CPU thread{'s' if threads > 1 else ''})", flush=True)  # fmt: skip

    def write(report: dict, figure: bool) -> list[tuple[str, str | None]]:
        paths = [default_path(report)] + ([args.json] if args.json else [])
        return [(path, save(report, path, figure)) for path in dict.fromkeys(map(os.path.abspath, paths))]

    report = run(settings, device, args.sections, log=lambda text: print(text, flush=True),
                 checkpoint=lambda partial: write(partial, figure=False))  # fmt: skip
    for path, png in write(report, figure=True):
        print(f"wrote {path} and {png}" if png else f"wrote {path} (no figure: matplotlib is not installed)")
    print(f"({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
