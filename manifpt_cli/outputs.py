"""Writing results without losing or corrupting anything (README, "Outputs and custody").

Every file manifpt writes goes through :func:`atomic_outputs`:

- Before any work, :func:`check_outputs` refuses an output that is an input (or lies inside an
  input folder), an existing file unless ``overwrite`` is set, an existing folder, or a folder
  path whose parent does not exist (only the last folder is ever created).
- While it is written, the output is locked (``flock`` on ``.NAME.lock`` beside it): a second run
  writing the same output is refused, whatever its PID or container. Data goes to a partial file
  with a unique name (``.NAME.partial-<uuid>``); partial files of dead runs are removed.
- Files written together (a report and its provenance, a model and its backbone) are committed
  all or nothing: old versions are kept as hard-linked backups until every new file is in place,
  and an interruption between two renames is rolled back (at once, or by the next run that takes
  the lock, from the journal ``.NAME.commit``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ManifptError, UsageError

PathLike = str | os.PathLike


class OutputRefusedError(UsageError):
    """An output path would overwrite an input or an existing result, or cannot be created."""


class OutputBusyError(UsageError):
    """Another run is writing the same output right now."""


class NoSpaceError(ManifptError):
    """The disk (or quota) ran out while writing; nothing was left under the final name."""


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (or a dangling link): not the same existing file
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_outputs(
    outputs: Sequence[PathLike], *, inputs: Sequence[PathLike] = (), overwrite: bool = False, folders: bool = False
) -> None:
    """Refuse, before any work, outputs that would lose or change something.

    Args:
        outputs: the files (or, with ``folders``, the folders) the run will write.
        inputs: files and folders the run reads; no output may be one of them or lie inside one.
        overwrite: allow replacing existing output files (never inputs).
        folders: the outputs are folders that receive several files (evaluation results).

    Raises:
        OutputRefusedError: with the reason and what to do instead.
    """
    resolved_inputs = [(os.fspath(p), os.path.realpath(p)) for p in inputs if os.path.lexists(p)]
    for output in outputs:
        text = os.fspath(output)
        real = os.path.realpath(output)
        for given, real_input in resolved_inputs:
            if real == real_input or _same_file(output, given):
                raise OutputRefusedError(f"refusing to write {text}: it is the input {given}; choose another output")
            if os.path.isdir(real_input) and _inside(real, real_input):
                raise OutputRefusedError(
                    f"refusing to write {text}: it is inside the input folder {given}, which must stay as it was; "
                    "write results elsewhere"
                )
        if os.path.isdir(output) and not folders:
            raise OutputRefusedError(f"refusing to write {text}: it is an existing folder; name a file to write")
        if os.path.lexists(output) and not os.path.isdir(output) and folders:
            raise OutputRefusedError(f"refusing to write into {text}: it is a file, not a folder")
        if os.path.lexists(output) and not overwrite and not folders:
            raise OutputRefusedError(f"{text} already exists; pass --overwrite (overwrite=True) to replace it")
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent) and not os.path.isdir(os.path.dirname(parent)):
            raise OutputRefusedError(
                f"cannot write {text}: the folder {os.path.dirname(parent)} does not exist "
                "(manifpt creates at most the last folder of an output path; check for a typo)"
            )


def results_folder(
    folder: PathLike, names: Sequence[str], *, inputs: Sequence[PathLike] = (), overwrite: bool = False
) -> Path:
    """A folder for several result files, checked up front: created if missing (its last component
    only), and refused if any of ``names`` is already in it, unless ``overwrite``."""
    check_outputs([folder], inputs=inputs, folders=True)
    out = make_folder(folder)
    check_outputs([out / name for name in names], overwrite=overwrite)
    return out


def make_folder(path: PathLike) -> Path:
    """Create an output folder, but only its last component (a typo never becomes a folder tree)."""
    folder = Path(path)
    if not folder.parent.is_dir():
        raise OutputRefusedError(f"cannot create {folder}: the folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    return folder


class OutputWriteError(ManifptError):
    """The operating system failed to write or rename an output (an I/O error, a read-only disk)."""


WRITE_ERRNOS = (errno.EIO, errno.EROFS, errno.EFBIG)


@contextlib.contextmanager
def _write_errors_are_clear(path: Path) -> Iterator[None]:
    """A full disk, an I/O error or a read-only disk becomes one clear error; nothing is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(
                f"no space left on the device holding {path.parent}: {path.name} was not written"
            ) from None
        if exc.errno in WRITE_ERRNOS:
            raise OutputWriteError(
                f"{exc.strerror} while writing {path}; it was not written (the previous file, if any, is unchanged)"
            ) from None
        raise


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside an output."""

    def __init__(self, final: Path) -> None:
        self.path = final.with_name(f".{final.name}.lock")
        self.final = final
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise OutputRefusedError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"another manifpt run is writing {self.final} right now; wait for it, or write elsewhere"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed while we waited to lock it
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _journal_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.commit")


def _recover(final: Path) -> None:
    """Finish or undo a group commit that a dead run left half done, and drop its partial files."""
    journal = _journal_path(final)
    if journal.exists():
        try:
            entries = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []
        committed_all = all(not os.path.lexists(entry["partial"]) for entry in entries)
        for entry in entries:
            target, backup, partial = entry["final"], entry["backup"], entry["partial"]
            if not committed_all and not os.path.lexists(partial):  # this one was renamed: undo it
                if backup:
                    os.replace(backup, target)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target)
            for leftover in (backup, partial):
                if leftover:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
        journal.unlink()
    # Partial files, and backups made before a commit journal was written, of runs that died.
    for pattern in (".{}.partial-*", ".{}.backup-*"):
        for stale in final.parent.glob(pattern.format(glob_escape(final.name))):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write_journal(journal: Path, entries: list[dict]) -> None:
    temporary = journal.with_name(f"{journal.name}-{uuid.uuid4().hex}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(entries, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, journal)


def _commit(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Rename every partial onto its final name, all or nothing."""
    for _, final in pairs:
        if final.exists() and not overwrite:
            raise OutputRefusedError(f"{final} appeared while this run wrote it; nothing was replaced")
    if len(pairs) == 1:
        os.replace(*pairs[0])
        return
    entries = []
    for partial, final in pairs:
        backup = None
        if final.exists():
            backup = final.with_name(f".{final.name}.backup-{uuid.uuid4().hex}")
            os.link(final, backup)
        entries.append(
            {"final": os.fspath(final), "backup": os.fspath(backup) if backup else None, "partial": os.fspath(partial)}
        )
    journal = _journal_path(pairs[0][1])
    _write_journal(journal, entries)
    done: list[dict] = []
    try:
        for entry in entries:
            os.replace(entry["partial"], entry["final"])
            done.append(entry)
    except BaseException:
        for entry in reversed(done):  # if undoing fails too, the journal stays for the next run
            if entry["backup"]:
                os.replace(entry["backup"], entry["final"])
            else:
                os.unlink(entry["final"])
        _drop_journal(journal, entries)
        raise
    _drop_journal(journal, entries)


def _drop_journal(journal: Path, entries: list[dict]) -> None:
    for entry in entries:
        if entry["backup"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry["backup"])
    journal.unlink()


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[PathLike], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield partial paths for ``paths``; they become the final files together, only if the block succeeds.

    An interrupted or failed run (Ctrl-C, a full disk, an I/O error) leaves every final name as it
    was. The outputs are locked against concurrent runs while they are written.
    """
    finals = [Path(os.path.abspath(p)) for p in paths]
    for final in finals:
        if not final.parent.is_dir():
            make_folder(final.parent)
    locks = [_Lock(final) for final in sorted(finals)]
    try:
        for lock in locks:
            lock.acquire()
        for final in finals:
            _recover(final)
            if final.exists() and not overwrite:
                raise OutputRefusedError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
        partials = [final.with_name(f".{final.name}.partial-{uuid.uuid4().hex}") for final in finals]
        try:
            with _write_errors_are_clear(finals[0]):
                yield partials
                _commit(list(zip(partials, finals)), overwrite)
        finally:
            for partial in partials:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
    finally:
        for lock in locks:
            lock.release()


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_outputs` for one file."""
    with atomic_outputs([path], overwrite=overwrite) as (partial,):
        yield partial
