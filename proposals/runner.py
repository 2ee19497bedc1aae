"""Compute proposals for many images: cached ones served, missing ones in parallel, resumable.

`run_proposals(items, settings, cache, jobs=..., scheduler=...)` takes `(key, image path)` pairs
(VOC image ids, or any names for a folder of files), serves what the cache holds, and computes the
rest with one of:

- `jobs` local worker processes (default: all cores; `concurrent.futures.ProcessPoolExecutor`
  with the `forkserver` start method where available, else `spawn`; OpenCV, torch and BLAS
  single-threaded in each worker); `jobs=1` computes in this process, without a pool;
- an existing Dask cluster, when `scheduler` is its address (`dask.distributed.Client`): the same
  function runs on the workers (which must see the image paths), and the results come back to
  this process, which writes the cache. Run Dask workers with `--nthreads 1`: selective search
  holds a process-wide lock (the C library's RNG), so threads of one worker do not add speed.

Each result is written to the cache as soon as it arrives, so `kill -9` loses at most the images
in flight and the same call resumes. A bad image is reported (`file: reason`) and skipped.
Timing: `seconds` of a result is the compute time (decode + selective search) measured where the
image was processed; a cached result keeps the seconds of the run that computed it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import numpy as np

from data.errors import SppnetError
from proposals.cache import ProposalCache, file_sha256
from proposals.selective_search import ProposalSettings

__all__ = ["ProposalResult", "ProposalError", "ProposalRun", "run_proposals", "compute_one",
           "default_jobs"]


@dataclass(frozen=True)
class ProposalResult:
    """The proposals of one image: float32 `[N, 4]` boxes (0-based xyxy), compute seconds, the
    image size, and whether they came from the cache."""

    key: str
    path: Path
    boxes: np.ndarray
    seconds: float
    width: int
    height: int
    cached: bool


@dataclass(frozen=True)
class ProposalError:
    """An image that could not be processed; `str()` is `file: reason`."""

    key: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ProposalRun:
    """What `run_proposals` did: results in item order (failed images left out), errors, wall
    time, and how the missing images were computed."""

    results: list[ProposalResult]
    errors: list[ProposalError]
    wall_seconds: float
    backend: str
    workers: int
    damaged: list[str] = field(default_factory=list)

    @property
    def computed(self) -> int:
        """Images computed in this run."""
        return sum(not r.cached for r in self.results)

    @property
    def cached(self) -> int:
        """Images served from the cache."""
        return sum(r.cached for r in self.results)

    def boxes(self) -> dict[str, np.ndarray]:
        """key -> boxes."""
        return {r.key: r.boxes for r in self.results}


def default_jobs() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# The per-image function (runs in workers: local processes or Dask)


_WORKER_READY = False
DASK_CONNECT_TIMEOUT = "20s"  # how long to try reaching --scheduler before giving up


def _single_thread() -> None:
    """One thread for OpenCV (and torch / BLAS when loaded) in this process: parallelism comes
    from processes. Idempotent."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import cv2

    from proposals.selective_search import check_seeding

    cv2.setNumThreads(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    check_seeding()  # once per process, and keeps OpenCV's first-call cost out of the timings
    _WORKER_READY = True


def compute_one(path: str, settings: ProposalSettings, exif_orientation: bool = True
                ) -> dict[str, Any]:
    """Selective search on one image file (read with its EXIF orientation applied, or as
    stored), for a worker: never raises for a bad image.

    Returns a dict with `boxes` (float32 [N, 4]), `seconds` (decode + search), `width`,
    `height`, `sha256` (of the file bytes that were read), or `error` (a one-line reason).
    Sets this process single-threaded first (it is meant for worker processes).
    """
    _single_thread()
    return _compute(path, settings, exif_orientation)


def _compute(path: str, settings: ProposalSettings, exif_orientation: bool = True
             ) -> dict[str, Any]:
    """`compute_one` without touching the process's thread settings."""
    from data.errors import ImageLoadError
    from data.images import load_image
    from proposals.selective_search import selective_search

    start = time.perf_counter()
    try:
        image = load_image(path, exif_orientation=exif_orientation)
        digest = file_sha256(path)
    except ImageLoadError as exc:
        return {"error": exc.reason}
    except OSError as exc:
        return {"error": f"cannot read file: {exc.strerror or exc}"}
    try:
        boxes = selective_search(image, settings)
    except SppnetError:
        raise  # a setup problem (no cv2.ximgproc, no srand): stops the run
    except Exception as exc:  # noqa: BLE001 - an OpenCV failure on this one image
        return {"error": f"selective search failed: {' '.join(str(exc).split())[:300]}"}
    return {"boxes": boxes, "seconds": time.perf_counter() - start, "sha256": digest,
            "width": int(image.shape[1]), "height": int(image.shape[0])}


def _init_worker(parent_pid: int | None = None) -> None:
    """Pool worker set-up: single-threaded, and exit when the parent run is killed (a worker
    of a forkserver is the server's child, so it is not told when the run dies)."""
    _single_thread()
    if parent_pid is not None and os.name == "posix":
        import threading

        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                         name="sppnet-parent-watch").start()


def _exit_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Poll `parent_pid`; end this process at once when it is gone (POSIX only: on Windows
    `os.kill` would terminate the parent)."""
    while True:
        time.sleep(interval)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass  # exists but not ours to signal: still alive


# --------------------------------------------------------------------------------------------
# Backends: each yields (index, result dict) as results complete


def _run_inline(todo: list[tuple[int, str, bool]], settings: ProposalSettings
                ) -> Iterator[tuple[int, dict]]:
    import cv2

    from proposals.selective_search import check_seeding

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    check_seeding()
    try:
        for index, path, oriented in todo:
            yield index, _compute(path, settings, oriented)
    finally:
        cv2.setNumThreads(threads)


def _run_pool(todo: list[tuple[int, str, bool]], settings: ProposalSettings, jobs: int
              ) -> Iterator[tuple[int, dict]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                   initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = {executor.submit(compute_one, path, settings, oriented): index
                   for index, path, oriented in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise SppnetError("a proposal worker process died (out of memory?); the "
                                      "finished images are cached: run the same command again "
                                      "to resume (with fewer --jobs if memory is short)") from None
                yield futures[future], result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_dask(todo: list[tuple[int, str, bool]], settings: ProposalSettings, scheduler: str
              ) -> Iterator[tuple[int, dict]]:
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise SppnetError(f"--scheduler needs dask.distributed ({exc}): "
                          f"pip install 'dask[distributed]'") from None
    try:
        client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SppnetError(f"cannot connect to the Dask scheduler at {scheduler}: "
                          f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    try:
        paths = [path for _, path, _ in todo]
        oriented = [flag for _, _, flag in todo]
        futures = client.map(compute_one, paths, [settings] * len(todo), oriented, pure=False,
                             retries=1)
        index_of = {future.key: index for future, (index, _, _) in zip(futures, todo)}
        for future in as_completed(futures, loop=client.loop):
            index = index_of[future.key]
            try:
                result = future.result()
            except SppnetError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: this image only
                result = {"error": f"failed on the Dask cluster: {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:300]}"}
            future.release()
            yield index, result
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# The runner


def _read_as(sha256: str, exif_orientation: bool) -> str:
    """The cache's identity of an image: its file's SHA-256, tagged when the pixels are read
    without their EXIF orientation (other pixels, so other boxes)."""
    return sha256 if exif_orientation else f"{sha256}+stored-orientation"


def run_proposals(items: Sequence[tuple[str, str | Path]], settings: ProposalSettings,
                  cache: ProposalCache | None = None, *, jobs: int | None = None,
                  scheduler: str | None = None, progress: bool = True,
                  stored_orientation: Collection[str] = ()) -> ProposalRun:
    """Proposals for every `(key, image path)` item: from `cache` when it holds a valid entry
    (same key, same file bytes read the same way, same settings), else computed and written to
    `cache` at once.

    Args:
        items: unique keys with image paths (any readable image files).
        settings: selective search settings (the cache's, when a cache is given).
        cache: where results are read and written; None computes everything.
        jobs: local worker processes (default: all cores); 1 computes in this process.
        scheduler: a Dask scheduler address ("tcp://host:8786"): compute there instead.
        progress: show a tqdm progress bar on stderr (and say at once which images are
            skipped).
        stored_orientation: keys of images to read without their EXIF orientation (annotated
            on the stored pixels: `VOCImage.exif_orientation`); the others are read turned.

    Returns:
        A `ProposalRun`: results in item order (bad images left out, listed in `errors`).

    Raises:
        SppnetError: a setup problem (no cv2.ximgproc, unreachable scheduler, a dead worker).
    """
    if cache is not None and cache.settings != settings:
        raise ValueError("the cache was opened with other settings")
    keys = [str(key) for key, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("run_proposals: the item keys must be unique")
    if jobs is not None and jobs < 1:
        raise SppnetError(f"--jobs {jobs}: must be at least 1")
    start = time.perf_counter()
    stored = frozenset(stored_orientation)
    paths = [Path(p) for _, p in items]
    results: list[ProposalResult | None] = [None] * len(items)
    errors: dict[int, ProposalError] = {}
    todo: list[tuple[int, str]] = []
    stream: Iterator[tuple[int, dict]] = iter(())
    backend, workers = "cache", 0

    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="proposals", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for index, (key, path) in enumerate(zip(keys, paths)):
            if cache is not None:
                try:
                    digest = file_sha256(path)
                except OSError:
                    pass  # the worker reports the problem
                else:
                    entry = cache.load(key, _read_as(digest, key not in stored))
                    if entry is not None:
                        results[index] = ProposalResult(key, path, entry.boxes, entry.seconds,
                                                        entry.width, entry.height, True)
                        bar.update(1)
                        continue
            todo.append((index, str(path.resolve()), key not in stored))

        if todo and scheduler:
            backend, stream = "dask", _run_dask(todo, settings, scheduler)
        elif todo:
            workers = min(jobs or default_jobs(), len(todo))
            if workers == 1:
                backend, stream = "inline", _run_inline(todo, settings)
            else:
                backend, stream = "processes", _run_pool(todo, settings, workers)
        bar.set_postfix_str(f"{len(items) - len(todo)} cached, computing {len(todo)} "
                            f"({backend}{f' x{workers}' if workers > 1 else ''})")

        for index, out in stream:
            key, path = keys[index], paths[index]
            if "error" in out:
                errors[index] = ProposalError(key, path, out["error"])
                if progress:  # said at once on a long run; the caller lists errors at the end
                    tqdm.write(f"skipped {path}: {out['error']}", file=sys.stderr)
            else:
                if cache is not None:
                    cache.store(key, _read_as(out["sha256"], key not in stored),
                                out["boxes"], out["seconds"], out["width"], out["height"])
                results[index] = ProposalResult(key, path, out["boxes"], float(out["seconds"]),
                                                out["width"], out["height"], False)
            bar.update(1)
    finally:
        bar.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # a generator: shuts its pool or Dask client down now, even on errors
    return ProposalRun(
        results=[r for r in results if r is not None],
        errors=[errors[i] for i in sorted(errors)],
        wall_seconds=time.perf_counter() - start, backend=backend,
        workers=workers if backend != "dask" else 0,
        damaged=list(cache.damaged) if cache is not None else [])
