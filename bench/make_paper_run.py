"""Write the paper-sized traversal (18 rows x 217 frames of 1024 x 768) as a folder.

The frames are written as uncompressed BMP so that reading them back costs
about as much as grabbing them from a capture card would, and the replay
timing measures cemi-stream rather than a PNG decoder.  Takes a few minutes
and ~3 GB of disk; used by ``bench/bench_paper_run.py``.

Usage: ``python -m bench.make_paper_run OUT_DIR [--rows 18] [--frames-per-row 217]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2

from cemi_stream.progress import Progress
from drivers.sim import SimConfig, SimSource


def main() -> None:
    """Render and write the frames plus ground_truth.csv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--frames-per-row", type=int, default=217)
    parser.add_argument("--noise", default="ld")
    args = parser.parse_args()
    config = SimConfig(rows=args.rows, frames_per_row=args.frames_per_row, noise=args.noise, seed=5)
    frames_dir = args.out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=False)
    source = SimSource(config)
    source.open()
    bar = Progress("render", source.info.frame_count, interval_s=10)
    t0 = time.perf_counter()
    with open(args.out / "ground_truth.csv", "w", encoding="utf-8") as truth:
        truth.write("src_index,row,x_px,y_px\n")
        while (frame := source.read()) is not None:
            i = frame.meta.src_index
            if not cv2.imwrite(str(frames_dir / f"{i:06d}.bmp"), frame.image):
                raise SystemExit(f"cannot write frame {i}")
            t = source.truth_for(i)
            truth.write(f"{i},{t.row},{t.x_px:.3f},{t.y_px:.3f}\n")
            bar.update(i + 1)
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"wrote {source.info.frame_count} frames in {seconds:.0f} s to {args.out}")


if __name__ == "__main__":
    main()
