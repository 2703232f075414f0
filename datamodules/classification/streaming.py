"""Image classification as LitData streams: convert an ImageFolder tree once, stream it from disk or S3.

`LitData <https://github.com/Lightning-AI/litData>`_ (Lightning's streaming data engine) packs samples
into a few large binary chunk files plus an ``index.json``; a ``StreamingDataset`` reads them from a local
folder or an object store (``s3://``, ``gs://``, ``azure://``), splits the chunks across DDP ranks and
DataLoader workers and caches what it downloaded. For ImageNet-sized sets this replaces 1.28 M small-file
opens per epoch with sequential reads of ~64 MB chunks, and no file listing at start-up.

:func:`convert_image_folder` writes one split: every image's encoded bytes exactly as on disk (JPEG stays
JPEG: no decoding or re-encoding, so the stream decodes to the same pixels as the folder), its label, its
index in the sorted file list and its path relative to the split folder. The class list goes into
``classes.json`` beside LitData's ``index.json``. :class:`ImageStreamDataset` decodes the bytes with
OpenCV as :func:`~datamodules.datasets.read_image` does and applies an albumentations pipeline;
:class:`~datamodules.ImageNetDataModule` uses it when given ``stream_dir``.

Command line (``DATA_DIR`` holds ``train/`` and ``val/`` with one folder per class; writes
``OUT_DIR/train`` and ``OUT_DIR/val``; an existing ``OUT_DIR`` is never overwritten)::

    python -m datamodules.classification.streaming convert /data/imagenet /data/imagenet-stream --workers 8

Upload the result as it is to use it from object storage, e.g. ``aws s3 cp --recursive
/data/imagenet-stream s3://bucket/imagenet-stream``, then pass ``stream_dir="s3://bucket/imagenet-stream"``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch import Tensor

from datamodules.corrupt import CorruptFileError, CorruptFileLog
from datamodules.datasets import IMG_EXTENSIONS, _seed_from_torch, find_classes, list_images

try:  # optional dependency: pip install "lightningkd[stream]"
    import litdata
    from litdata import StreamingDataLoader, StreamingDataset
except ImportError:  # pragma: no cover - exercised only where litdata is missing
    litdata = None
    StreamingDataset = object  # type: ignore[assignment,misc]
    StreamingDataLoader = None  # type: ignore[assignment,misc]

__all__ = [
    "CLASSES_FILE",
    "ImageStreamDataset",
    "convert_image_folder",
    "convert_splits",
    "read_stream_classes",
]

#: Name of the file beside LitData's ``index.json`` that holds the class list of a converted split.
CLASSES_FILE = "classes.json"
_FORMAT = "lightningkd-image-classification-stream/1"
_INSTALL_HINT = 'LitData is not installed: pip install "lightningkd[stream]" (or pip install litdata).'


def require_litdata() -> None:
    """Raise ``ModuleNotFoundError`` with the install command when LitData is missing."""
    if litdata is None:
        raise ModuleNotFoundError(_INSTALL_HINT)


def expected_layout(splits: Sequence[str] = ("train", "val")) -> str:
    """The folder tree the converter reads, for error messages."""
    first, *rest = list(splits) or ["train"]
    lines = [
        "Expected an ImageFolder tree, one sub-folder per class (the same class names in every split):",
        "    DATA_DIR/",
        f"    ├── {first}/",
        "    │   ├── n01440764/",
        "    │   │   ├── n01440764_10026.JPEG",
        "    │   │   └── ...",
        "    │   └── .../",
    ]
    for name in rest:
        lines += [f"    └── {name}/", "        └── n01440764/ ..."]
    lines.append(f"Image files end in one of {', '.join(IMG_EXTENSIONS)} (any case).")
    return "\n".join(lines)


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether LitData reads ``uri`` through its downloader and cache: object storage (``s3://``,
    ``gs://``, ...) or its ``local:/path`` mode, which streams a local folder the same way."""
    uri = os.fspath(uri)
    return "://" in uri or uri.startswith("local:")


def join_uri(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local folder or an object-store URI."""
    base = os.fspath(base)
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else os.path.join(os.path.expanduser(base), name)


class _EncodeSample:
    """The per-sample function of ``litdata.optimize``: file bytes + label + index + relative path.

    Each file is decoded once to make sure the stream holds no unreadable image; a file that does not
    decode is recorded in ``log`` (which the parent process reads back: LitData re-raises a worker's
    error as a ``RuntimeError``) and then left out (``skip``) or raised. A generator (zero or one sample
    per input) so that skipped files produce nothing.
    """

    def __init__(
        self, split_dir: str, files: np.ndarray, labels: np.ndarray, log: CorruptFileLog, skip: bool
    ) -> None:
        self.split_dir, self.files, self.labels, self.log, self.skip = split_dir, files, labels, log, skip

    def __call__(self, index: int) -> Iterator[dict[str, Any]]:
        path = os.path.join(self.split_dir, os.fsdecode(self.files[index]))
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            data, reason = b"", f"Cannot open image file '{path}': {err}"
        else:
            reason = f"Cannot decode image file '{path}': it is empty, truncated, corrupt or not an image."
        buffer = np.frombuffer(data, np.uint8)
        if buffer.size == 0 or cv2.imdecode(buffer, cv2.IMREAD_COLOR) is None:
            self.log.record(path, reason)
            if not self.skip:
                raise CorruptFileError(reason, path)
            return
        yield {
            "image": data,  # the encoded file as on disk
            "label": int(self.labels[index]),
            "index": int(index),  # position in the sorted file list of the split
            "path": bytes(self.files[index]),  # relative to the split folder (bytes: no str/path guessing)
        }


def convert_image_folder(
    split_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    classes: Sequence[str] | None = None,
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    skip_corrupt: bool = False,
) -> dict[str, Any]:
    """Write one ImageFolder split (``split_dir/<class>/<image>``) as a LitData stream in ``output_dir``.

    Files are listed as :class:`~datamodules.ImageFolderDataModule` lists them (sorted, recursive below
    each class folder, hidden files skipped) and labelled with their class folder's index in
    ``classes``. The stream is written to a temporary sibling folder and renamed to ``output_dir`` when
    complete, so an interrupted run leaves no half-written stream under that name.

    Args:
        split_dir: a split folder with one sub-folder per class.
        output_dir: new local folder for the stream; must not exist (nothing is overwritten).
        classes: class names in label order; default the sorted class folders of ``split_dir``. Give the
            training split's list when converting a validation split.
        num_workers: processes that read and pack the files (``litdata.optimize``).
        chunk_bytes: target size of a chunk file (LitData's ``chunk_bytes``, e.g. ``"64MB"``).
        skip_corrupt: leave out files that cannot be read or decoded (listed in the returned summary and
            in ``classes.json``) instead of stopping with an error naming the first one.

    Returns:
        The content of ``classes.json``: ``classes``, ``num_samples``, ``skipped`` and ``source``.

    Raises:
        FileExistsError: ``output_dir`` exists.
        FileNotFoundError: ``split_dir`` is missing, has no class folders or no images (the message
            shows the expected tree).
        ValueError: ``split_dir`` has class folders that are not in ``classes``.
        CorruptFileError: a file cannot be read or decoded (without ``skip_corrupt``).

    Example:
        >>> import tempfile, cv2, numpy as np
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / "train" / name).mkdir(parents=True)
        ...     _ = cv2.imwrite(str(root / "train" / name / "0.jpg"), np.zeros((8, 8, 3), np.uint8))
        >>> info = convert_image_folder(root / "train", root / "stream-train")
        >>> info["classes"], info["num_samples"], read_stream_classes(root / "stream-train")
        (['cat', 'dog'], 2, ['cat', 'dog'])
    """
    require_litdata()
    split_dir, output_dir = Path(split_dir).expanduser(), Path(output_dir).expanduser()
    if is_remote(output_dir):
        raise ValueError(
            f"output_dir must be a local folder, got '{output_dir}'; convert locally, then upload the folder "
            "(e.g. aws s3 cp --recursive) and stream it from there."
        )
    if output_dir.exists():
        raise FileExistsError(
            f"'{output_dir}' already exists; nothing is overwritten. Choose a new output folder, or delete "
            "this one yourself if it is an old stream you no longer need."
        )
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"'{split_dir}' does not exist or is not a folder.\n{expected_layout()}")
    found = find_classes(split_dir)
    if not found:
        flat = any(p.suffix.lower() in IMG_EXTENSIONS for p in split_dir.iterdir())
        hint = " It holds images directly: sort them into one folder per class." if flat else ""
        raise FileNotFoundError(f"'{split_dir}' has no class sub-folders.{hint}\n{expected_layout()}")
    classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"'{split_dir}' has class folders that are not in the class list: {unknown[:10]}; every split "
            "must use the training split's class names."
        )
    files, labels = list_images(split_dir, classes)
    if len(files) == 0:
        raise FileNotFoundError(
            f"No image files under the class folders of '{split_dir}'.\n{expected_layout()}"
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        log = CorruptFileLog(partial / "unreadable.jsonl")
        # litdata.optimize sets the process-wide start method; the caller's is put back afterwards
        start_method = multiprocessing.get_start_method(allow_none=True)
        # its scratch copies of the chunks go beside the output (not /tmp) and are deleted with it
        scratch = {
            name: str(partial / name)
            for name in ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
        }
        environ_before = {name: os.environ.get(name) for name in scratch}
        os.environ.update(scratch)
        try:
            litdata.optimize(
                fn=_EncodeSample(str(split_dir), files, labels, log, skip_corrupt),
                inputs=list(range(len(files))),
                output_dir=str(partial / "stream"),
                chunk_bytes=chunk_bytes,
                num_workers=min(num_workers, len(files)),
                reorder_files=False,
                # fork: the workers inherit the loaded modules instead of importing torch & co. again
                start_method="fork",
                verbose=False,
            )
        except RuntimeError as err:
            unreadable = log.entries()
            if not unreadable:
                raise
            path, reason = unreadable[0]
            raise CorruptFileError(
                f"{reason} Remove or repair it, or convert with skip_corrupt=True (--skip-corrupt) to leave "
                "unreadable files out.",
                path,
            ) from err
        finally:
            multiprocessing.set_start_method(start_method, force=True)
            for name, value in environ_before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        skipped = sorted(path for path, _ in log.entries())
        info = {
            "format": _FORMAT,
            "classes": classes,
            "num_samples": len(files) - len(skipped),
            "skipped": skipped,
            "source": str(split_dir.absolute()),
        }
        # classes.json is written last: a stream folder with it is complete
        (partial / "stream" / CLASSES_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.rename(partial / "stream", output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info


def convert_splits(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "val"),
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    skip_corrupt: bool = False,
) -> dict[str, dict[str, Any]]:
    """Convert ``data_dir/<split>/`` for every split into ``output_dir/<split>/`` with one class list.

    The class list is that of the first split (the training split), so labels agree across splits, as
    in :class:`~datamodules.ImageFolderDataModule`. ``output_dir`` must not exist.

    Returns:
        The summary of :func:`convert_image_folder` per split.
    """
    data_dir, output_dir = Path(data_dir).expanduser(), Path(output_dir).expanduser()
    if not splits:
        raise ValueError("Give at least one split to convert, e.g. splits=('train', 'val').")
    if output_dir.exists():
        raise FileExistsError(
            f"'{output_dir}' already exists; nothing is overwritten. Choose a new output folder, or delete "
            "this one yourself if it is an old stream you no longer need."
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"'{data_dir}' does not exist or is not a folder.\n{expected_layout(splits)}")
    missing = [s for s in splits if not (data_dir / s).is_dir()]
    if missing:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir())
        raise FileNotFoundError(
            f"No {', '.join(repr(m + '/') for m in missing)} folder in '{data_dir}'; it contains "
            f"{entries[:10]}.\n{expected_layout(splits)}"
        )
    classes = find_classes(data_dir / splits[0])
    output_dir.mkdir(parents=True)
    return {
        split: convert_image_folder(
            data_dir / split,
            output_dir / split,
            classes=classes,
            num_workers=num_workers,
            chunk_bytes=chunk_bytes,
            skip_corrupt=skip_corrupt,
        )
        for split in splits
    }


def read_stream_classes(
    stream_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """The class list of a converted split (its ``classes.json``), local or in object storage.

    Raises:
        FileNotFoundError: the folder is not a complete stream written by :func:`convert_image_folder`.
    """
    uri = os.fspath(stream_dir)
    hint = (
        "Write one with: python -m datamodules.classification.streaming convert DATA_DIR OUT_DIR "
        "(a complete stream folder holds index.json, classes.json and chunk-*.bin files)."
    )
    if is_remote(uri):
        require_litdata()
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory(prefix="lightningkd-stream-") as tmp:
            local = os.path.join(tmp, CLASSES_FILE)
            try:
                get_downloader(uri, tmp, [], storage_options or {}).download_file(
                    join_uri(uri, CLASSES_FILE), local
                )
                text = Path(local).read_text(encoding="utf-8")
            except Exception as err:  # the object-store clients raise their own error types
                raise FileNotFoundError(
                    f"Cannot read '{join_uri(uri, CLASSES_FILE)}' ({type(err).__name__}: {err}). {hint}"
                ) from err
    else:
        folder = Path(uri).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Stream folder '{folder}' does not exist. {hint}")
        if not (folder / "index.json").is_file():
            raise FileNotFoundError(f"'{folder}' has no index.json: it is not a LitData stream. {hint}")
        if not (folder / CLASSES_FILE).is_file():
            raise FileNotFoundError(
                f"'{folder}' has no {CLASSES_FILE}: it was not written by this converter, or the conversion "
                f"did not finish. {hint}"
            )
        text = (folder / CLASSES_FILE).read_text(encoding="utf-8")
    info = json.loads(text)
    if info.get("format") != _FORMAT or not isinstance(info.get("classes"), list):
        raise ValueError(
            f"'{join_uri(uri, CLASSES_FILE)}' is not a class list written by this converter. {hint}"
        )
    return [str(c) for c in info["classes"]]


class _DecodeTransform:
    """LitData's per-item ``transform``: encoded bytes -> RGB ``uint8`` array -> albumentations -> sample.

    Forwards ``set_random_seed`` to the albumentations pipeline, so that
    :func:`~datamodules.datasets.seed_worker` gives every DataLoader worker its own augmentation stream.
    """

    def __init__(self, transform: Callable[..., dict[str, Any]] | None, stream: str) -> None:
        self.compose, self.stream = transform, stream

    def set_random_seed(self, seed: int) -> None:
        if hasattr(self.compose, "set_random_seed"):
            self.compose.set_random_seed(seed)

    def __call__(self, item: dict[str, Any]) -> tuple[Tensor | np.ndarray, int]:
        # the same decoding as datamodules.datasets.read_image: identical pixels for the same bytes
        image = cv2.imdecode(np.frombuffer(item["image"], np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            path = os.fsdecode(bytes(item["path"]))
            raise CorruptFileError(
                f"Cannot decode sample {item['index']} ('{path}') of stream '{self.stream}'.", path
            )
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.compose is not None:
            image = self.compose(image=image)["image"]
        return image, int(item["label"])


class ImageStreamDataset(StreamingDataset):
    """A split written by :func:`convert_image_folder`, streamed with LitData: ``(image, label)`` samples.

    A ``litdata.StreamingDataset`` (an ``IterableDataset``; also indexable) whose samples are decoded
    with OpenCV as RGB and passed through ``transform``. Iterate it with ``litdata.StreamingDataLoader``:
    under DDP each rank reads its own chunks, and within a rank each DataLoader worker its own part.
    Create it after the process group is up (in ``setup``): LitData reads the world size then.

    Args:
        input_dir: the stream folder, local or an object-store URI (``s3://bucket/imagenet-stream/train``).
        transform: albumentations pipeline called as ``transform(image=...)["image"]``; ``None`` returns
            the RGB ``uint8`` array.
        shuffle: shuffle chunks and the samples within them, differently every epoch.
        drop_last: give every rank the same number of samples, a multiple of the batch size (a few
            samples are left out each epoch: fewer than ``world size x batch size``); ``False`` reads every
            sample exactly once per epoch across all ranks, ranks may then differ by a few samples.
            ``None``: LitData's default (``True`` under DDP).
        cache_dir: where chunks downloaded from object storage are kept (LitData's default if ``None``).
        storage_options: passed to the object-store client (e.g. credentials, endpoint).

    Example:
        >>> import tempfile, cv2, numpy as np
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "train" / "cat").mkdir(parents=True)
        >>> _ = cv2.imwrite(str(root / "train" / "cat" / "0.png"), np.full((4, 6, 3), 9, np.uint8))
        >>> _ = convert_image_folder(root / "train", root / "stream")
        >>> image, label = ImageStreamDataset(str(root / "stream"))[0]
        >>> image.shape, image.dtype.name, int(image[0, 0, 0]), label
        ((4, 6, 3), 'uint8', 9, 0)
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        transform: Callable[..., dict[str, Any]] | None = None,
        shuffle: bool = False,
        drop_last: bool | None = None,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        require_litdata()
        input_dir = os.fspath(input_dir)
        if not is_remote(input_dir):
            input_dir = os.path.expanduser(input_dir)
        self.classes = read_stream_classes(input_dir, storage_options)  # also checks the folder
        super().__init__(
            input_dir,
            cache_dir=cache_dir,
            shuffle=shuffle,
            drop_last=drop_last,
            storage_options=storage_options,
        )
        # set after StreamingDataset.__init__ (which would wrap it in a list that seed_worker cannot seed)
        self.transform = _DecodeTransform(transform, input_dir)
        _seed_from_torch(transform)


def stream_loader(
    dataset: ImageStreamDataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
    pin_memory: bool = False,
) -> Any:
    """A ``litdata.StreamingDataLoader`` set up like the folder loaders (persistent, seeded workers)."""
    from datamodules.datasets import seed_worker

    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m datamodules.classification.streaming convert DATA_DIR OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.classification.streaming",
        description="Convert an ImageFolder tree into LitData streams for ImageNetDataModule(stream_dir=...).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="write DATA_DIR/<split>/<class>/<image> as OUT_DIR/<split>/ streams",
        description=expected_layout(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("data_dir", help="folder holding the split folders (e.g. train/ and val/)")
    convert.add_argument("output_dir", help="new folder for the streams (must not exist)")
    convert.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders; the first names the classes"
    )
    convert.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    convert.add_argument("--chunk-bytes", default="64MB", help="target chunk file size (default 64MB)")
    convert.add_argument(
        "--skip-corrupt", action="store_true", help="leave out unreadable images, listed at the end"
    )
    args = parser.parse_args(argv)
    try:
        summary = convert_splits(
            args.data_dir,
            args.output_dir,
            splits=args.splits,
            num_workers=args.workers,
            chunk_bytes=args.chunk_bytes,
            skip_corrupt=args.skip_corrupt,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, info in summary.items():
        print(
            f"{split}: {info['num_samples']} images, {len(info['classes'])} classes -> {args.output_dir}/{split}"
        )
        for path in info["skipped"]:
            print(f"  skipped unreadable file: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
