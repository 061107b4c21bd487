"""Training checkpoints with orbax: async saves, keep the last K, resume, restore onto any mesh.

Layout under ``directory`` (one folder per finalized step, written by orbax's CheckpointManager):

    <step>/state/    the state pytree (``StandardSave``: zarr arrays in an OCDBT store; every
                     process writes the shards it owns)
    <step>/extra/    the JSON dict (data iterator state, config, metrics)
    corrupt/<step>-<unix time>/   steps found corrupt, moved aside (never deleted)

Completion: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
once every process has written its part (on ``gs://`` it writes ``commit_success.txt`` into the
step folder instead of renaming). Only finalized steps are listed; leftovers of an interrupted
save are reported and removed.

Multi-host: every method except ``latest_step``/``all_steps`` must be called on every process
with the same arguments (orbax synchronises the processes inside ``save``; reads end with the
processes agreeing on the outcome, see ``TrainCheckpointer._read``); the directory must be on a
file system all processes share.
"""
import enum
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"
_CORRUPT_DIR = "corrupt"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
_STEP_NAME = re.compile(r"^(\d+)(" + re.escape(_TMP_SUFFIX) + r".*)?$")


# Read failures that mean the step's files are missing, truncated or corrupt: tensorstore's status
# codes for a missing key, lost data and a byte range past the end of a file, and the words of
# its decoders. Matched on messages without tensorstore's spec dump and quoted names (_message).
_CORRUPTION_STATUS = re.compile(r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE):")
_CORRUPTION_WORDS = re.compile(
    r"truncated|corrupt|error decoding|decompress\w*\(\) failed|unexpected end", re.IGNORECASE)
_TENSORSTORE_DUMP = re.compile(r" ?See full TensorStore details| \[tensorstore_spec=")


class CheckpointMismatchError(ValueError):
    """The restore target does not match the checkpoint (tree paths, shapes or dtypes)."""


class _Outcome(enum.IntEnum):
    """How reading a step went on one process; the processes act on the largest (the worst)."""
    OK = 0
    CORRUPT = 1     # the step's files are missing, truncated or undecodable: move the step aside
    FAILED = 2      # any other error (I/O hiccup, network, ...): retry, then raise; the step stays


class TrainCheckpointer:
    """Saves and restores ``(state, extra)`` per training step under one directory.

    ``state`` is a pytree of ``jax.Array`` (params, optimizer state, step counter, RNG keys);
    ``extra`` is a JSON-able dict. Typed PRNG key arrays (``jax.random.key``) are stored as
    their uint32 ``jax.random.key_data`` and rewrapped on restore when the target leaf is a key
    (``jax.random.wrap_key_data`` with the target's implementation), so a key saved typed can be
    restored as uint32 data and the other way round.

    On construction the directory is scanned: leftovers of interrupted saves are reported
    (``logging.warning`` with the step and the reason) and the newest finalized step whose
    metadata is corrupt is reported and moved to ``corrupt/``, so ``latest_step()`` is the
    newest usable step. ``restore()`` without a step falls back the same way when the arrays
    are corrupt (a missing or truncated file).

    Only recognisable corruption moves a step aside: a missing file of the step, a truncated or
    undecodable file, unreadable JSON (tensorstore's NOT_FOUND / DATA_LOSS / OUT_OF_RANGE, or
    its decoders' errors). Any other read error (a transient ``OSError``, a network error, ...)
    is retried ``read_attempts`` times in all, ``retry_delay`` seconds apart (doubling each
    time), then raised, leaving the step where it is.
    """

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = True, read_attempts: int = 3, retry_delay: float = 1.0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1 (steps between saves), got {save_every}")
        if read_attempts < 1:
            raise ValueError(f"read_attempts must be >= 1, got {read_attempts}")
        self.directory = epath.Path(directory)
        self.save_every = save_every
        self.read_attempts = read_attempts
        self.retry_delay = retry_delay
        for step, name, reason in _unfinalized(self.directory):
            logger.warning("Checkpoint step %d in %s is ignored: %s (%s).", step, self.directory,
                           reason, name)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        while (step := self.latest_step()) is not None:
            problem = self._read(step, lambda step=step: self._read_metadata(step))[1]
            if problem is None:
                break
            self._quarantine(step, f"metadata unreadable ({problem})")

    def latest_step(self) -> int | None:
        """The newest finalized step (an async save counts once ``save`` returned), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``extra`` at ``step`` if ``step % save_every == 0`` or force.

        Returns whether a save was started (False for an already saved step). With async saves
        this returns once the arrays are copied to host memory, so the caller may donate or
        overwrite ``state`` right away; the write finishes in the background (``wait()``).
        Older steps beyond the newest ``keep`` are deleted after the write.
        """
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"extra must be a JSON-serialisable dict: {e}") from None
        state = jax.tree.map(_key_data_if_typed, state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _EXTRA: ocp.args.JsonSave(extra)})
        return self._manager.save(step, args=args, force=True)

    def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, dict]:
        """Reads ``(state, extra)`` of ``step`` (default: the newest usable step).

        ``abstract_state``: the target pytree; leaves are ``jax.ShapeDtypeStruct`` (or arrays)
        whose ``.sharding`` says where each array goes, on any mesh: the checkpoint's own
        sharding does not matter. Tree paths, shapes and dtypes must equal the checkpoint's
        (a ValueError names the first tensor that differs). With ``step=None`` a corrupt step is
        reported (``logging.error``: the step, why, the step tried instead), moved to
        ``corrupt/`` and the next older one is tried. Other read errors are retried, then raised
        (see the class docstring); so is any error with an explicit ``step``.
        """
        target = _storage_target(abstract_state)
        if step is not None:
            return self._restore(step, target, abstract_state)
        while (latest := self.latest_step()) is not None:
            result, problem = self._read(
                latest, lambda latest=latest: self._restore(latest, target, abstract_state))
            if problem is None:
                return result
            self._quarantine(latest, problem)
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}")

    def wait(self) -> None:
        """Blocks until the pending async save is written and finalized (raises its error)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _restore(self, step: int, target: Any, abstract_state: Any) -> tuple[Any, dict]:
        step_dir = self.directory / str(step)
        _check_target(target, step_dir / _STATE, step)
        state = _read_item(ocp.StandardCheckpointHandler(), step_dir / _STATE,
                           ocp.args.StandardRestore(target))
        extra = _read_item(ocp.JsonCheckpointHandler(), step_dir / _EXTRA, ocp.args.JsonRestore())
        return jax.tree.map(_rewrap_key, abstract_state, state), extra

    def _read_metadata(self, step: int) -> None:
        """Reads the step's array metadata and its JSON item (raises if either is unreadable)."""
        _read_tree_metadata(self.directory / str(step) / _STATE)
        _read_item(ocp.JsonCheckpointHandler(), self.directory / str(step) / _EXTRA,
                   ocp.args.JsonRestore())

    def _read(self, step: int, read: Callable[[], Any]) -> tuple[Any, str | None]:
        """``(read(), None)``, or ``(None, why)`` when the step is corrupt on some process.

        Every process calls this together: each attempt ends with the processes agreeing on the
        worst outcome (an error that is not corruption outranks corruption). A
        ``CheckpointMismatchError`` is raised at once; other errors that are not corruption are
        retried, ``retry_delay * 2**k`` seconds after the k-th failed attempt, up to
        ``read_attempts`` attempts in all, then raised (on the processes whose read worked, as a
        RuntimeError naming the step).
        """
        _silence_abandoned_reads()  # before reading: the noise may come while the error propagates
        attempt = 1
        while True:
            result, error, corrupt = None, None, None
            try:
                result = read()
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted into corruption and other failures
                error, corrupt = e, _corruption(e, self.directory / str(step))
            outcome = (_Outcome.OK if error is None else
                       _Outcome.CORRUPT if corrupt is not None else _Outcome.FAILED)
            agreed = self._agree(outcome)
            if agreed == _Outcome.OK:
                return result, None
            if agreed == _Outcome.CORRUPT:
                return None, (_describe(corrupt) if corrupt is not None
                              else "corrupt on another process")
            if attempt == self.read_attempts:
                if error is not None:
                    raise error
                raise RuntimeError(f"reading checkpoint step {step} in {self.directory} failed on "
                                   f"another process ({attempt} attempts)")
            delay = self.retry_delay * 2 ** (attempt - 1)
            logger.warning("Reading checkpoint step %d in %s failed (attempt %d of %d: %s); "
                           "retrying in %.3g s.", step, self.directory, attempt, self.read_attempts,
                           _describe(_chain(error)[-1]) if error is not None
                           else "failed on another process", delay)
            time.sleep(delay)
            attempt += 1

    def _agree(self, outcome: _Outcome) -> _Outcome:
        """The worst outcome over the processes (one all-gather when there are several)."""
        if jax.process_count() == 1:
            return outcome
        gathered = multihost_utils.process_allgather(np.array([int(outcome)], np.int32))
        return _Outcome(int(np.max(gathered)))

    def _quarantine(self, step: int, reason: str) -> None:
        """Moves the corrupt ``step`` to ``corrupt/`` (the primary process moves) and reports it
        in one ``logging.error`` line: the step, why, and the step that will be tried instead."""
        target = self.directory / _CORRUPT_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kimi_jax_checkpoint_quarantine_{step}")
        self._manager.reload()
        fallback = self.latest_step()
        instead = (f"using step {fallback} instead" if fallback is not None
                   else "no older step left")
        logger.error("Checkpoint step %d in %s is corrupt and unusable: %s. Moved it to %s; %s.",
                     step, self.directory, reason, target, instead)


class SigtermFlag:
    """Tells the training loop to save and exit once SIGTERM arrived.

    Poll ``should_stop(step)`` once per step on every process, then save with ``force=True``,
    ``wait()`` and exit. One process: a Python SIGTERM handler sets the flag (the previous
    handler is put back by ``uninstall()``). Several processes (``jax.distributed`` initialised
    before this is built): JAX's preemption service catches SIGTERM on any host and
    ``should_stop`` is ``multihost_utils.reached_preemption_sync_point(step)``, True on all
    processes at the same step.
    """

    def __init__(self):
        self._event = threading.Event()
        self._installed = False
        self._previous = None
        if jax.process_count() > 1:
            if not jax.config.jax_enable_preemption_service:
                raise RuntimeError("SigtermFlag with several processes needs JAX's preemption "
                                   "service: set jax_enable_preemption_service=True before "
                                   "jax.distributed.initialize")
        else:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True

    def _on_signal(self, signum, frame) -> None:
        logger.warning("SIGTERM received: the training loop will save and exit.")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False


def _unfinalized(directory: epath.Path) -> list[tuple[int, str, str]]:
    """(step, folder name, reason) for step folders orbax never finalized.

    Mirrors orbax's default atomicity: a local step is final once renamed from
    ``<step>.orbax-checkpoint-tmp*``; a ``gs://`` step once ``commit_success.txt`` exists.
    """
    if not directory.exists():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        match = _STEP_NAME.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if match.group(2):
            found.append((int(match.group(1)), entry.name,
                          "temporary folder of an interrupted save, never finalized"))
        elif str(directory).startswith("gs://") and not (entry / _COMMIT_FILE).exists():
            found.append((int(match.group(1)), entry.name,
                          f"no {_COMMIT_FILE}, the save never finished"))
    return found


def _read_item(handler: Any, item_dir: epath.Path, args: Any) -> Any:
    """One item of a step, read by its orbax handler.

    Not through ``CheckpointManager.restore``: that ends with a barrier of all processes, which
    a process whose read failed never reaches; the checkpointer's own agreement (``_read``) is
    then the only collective, and every process takes part in it whatever its read did.
    """
    try:
        return handler.restore(item_dir, args=args)
    finally:
        handler.close()


def _read_tree_metadata(item_dir: epath.Path) -> dict:
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(item_dir)
    finally:
        handler.close()
    return getattr(metadata, "tree", metadata)


def _check_target(target: Any, item_dir: epath.Path, step: int) -> None:
    saved = dict(_flat_by_path(_read_tree_metadata(item_dir)))
    wanted = dict(_flat_by_path(target))
    if missing := sorted(wanted.keys() - saved.keys()):
        raise CheckpointMismatchError(f"step {step}: tensors {missing} of the restore target "
                                      "are not in the checkpoint")
    if unused := sorted(saved.keys() - wanted.keys()):
        raise CheckpointMismatchError(f"step {step}: checkpoint tensors {unused} are missing "
                                      "from the restore target")
    for name, want in wanted.items():
        have = saved[name]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            raise CheckpointMismatchError(
                f"step {step}: tensor {name!r} is {np.dtype(have.dtype).name}"
                f"{list(have.shape)} in the checkpoint but {np.dtype(want.dtype).name}"
                f"{list(want.shape)} in the restore target")


def _storage_target(abstract_state: Any) -> Any:
    """The target as stored: typed keys become their uint32 key data; every leaf needs a sharding."""
    for name, leaf in _flat_by_path(abstract_state):
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(f"restore target {name!r} has no sharding: give every leaf a "
                             "jax.ShapeDtypeStruct(shape, dtype, sharding=...)")
    return jax.tree.map(_key_data_target, abstract_state)


def _flat_by_path(tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(".".join(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _key_data_if_typed(x: Any) -> Any:
    return jax.random.key_data(x) if _is_typed_key(x) else x


def _key_data_target(leaf: Any) -> Any:
    """The uint32 key-data target for a typed-key leaf (same sharding); other leaves as given."""
    if not _is_typed_key(leaf):
        return leaf
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)


def _rewrap_key(target_leaf: Any, restored: Any) -> Any:
    if not _is_typed_key(target_leaf):
        return restored
    return jax.random.wrap_key_data(restored, impl=_key_impl_of(target_leaf))


def _key_impl_of(leaf: Any) -> Any:
    """The PRNG implementation of a typed-key leaf, read while tracing (no key is built)."""
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)),
                   jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return found[0]


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = _TENSORSTORE_DUMP.split(str(e))[0].strip().splitlines()
    return text[0][:limit] if text else ""


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    found = []
    while e is not None and e not in found:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


def _corruption(e: BaseException, step_dir: epath.Path) -> BaseException | None:
    """The exception in ``e``'s chain that shows the step's files are missing or corrupt, or None.

    Corruption: a JSON decode error, a FileNotFoundError naming a path in the step's folder, or
    a message with tensorstore's NOT_FOUND / DATA_LOSS / OUT_OF_RANGE status or a decoder's
    complaint (truncated, corrupt, error decoding, ...). Anything else (another OSError, a
    RuntimeError about something else) is not.
    """
    for x in _chain(e):
        if isinstance(x, json.JSONDecodeError):
            return x
        if isinstance(x, FileNotFoundError):
            if str(step_dir) in f"{x} {x.filename or ''}":
                return x
            continue
        if isinstance(x, OSError):
            continue
        text = _message(x)
        if _CORRUPTION_STATUS.search(text) or _CORRUPTION_WORDS.search(text):
            return x
    return None


def _message(e: BaseException) -> str:
    """``e``'s message without tensorstore's spec dump and quoted names (paths, keys), which may
    contain any word (a folder named 'corrupt_runs' must not read as corruption)."""
    return re.sub(r'"[^"]*"', '""', _TENSORSTORE_DUMP.split(str(e))[0])


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


# Noise of orbax's abandoned reads. When one array of a restore fails, orbax's asyncio.gather
# returns at once and its event loop is closed with the other reads still pending; later the
# reads' tensorstore callbacks hit the closed loop ("RuntimeError: Event loop is closed",
# reported as unraisable), the abandoned coroutines are collected ("Exception ignored in:
# <coroutine ...>") and asyncio reports their errors ("Task exception was never retrieved").
# The checkpointer's first read installs filters that drop exactly these reports for the rest of
# the process (nothing else passes through them): a failed read is reported once, by the
# checkpointer.
_ASYNCIO_NOISE = ("Task exception was never retrieved", "Future exception was never retrieved",
                  "Task was destroyed but it is pending")
_ORBAX_DIR = os.path.dirname(ocp.__file__)


def _is_abandoned_read_noise(exc: BaseException | None, obj: Any) -> bool:
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None) if inspect.iscoroutine(obj) else None
    return code is not None and code.co_filename.startswith(_ORBAX_DIR)


class _AbandonedReadLogFilter(logging.Filter):
    """Drops asyncio's reports of orbax/tensorstore reads nobody awaited any more."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(_ASYNCIO_NOISE)
                    and ("orbax" in message or "tensorstore" in message.lower()))


def _silence_abandoned_reads() -> None:
    """Installs (once) the unraisable hook and asyncio log filter that drop the noise above."""
    if not getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
        previous = sys.unraisablehook

        def hook(args):
            if not _is_abandoned_read_noise(args.exc_value, args.object):
                previous(args)

        hook._drops_abandoned_reads = True
        sys.unraisablehook = hook
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadLogFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReadLogFilter())

