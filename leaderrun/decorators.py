"""``@leader_only`` and a module-level ``is_leader()`` for the current elector.

The *current* elector is the one most recently started (``elector.start()`` or
``with LeaderElector(...)``) and not yet stopped, or the one set with
:func:`leaderrun.elector.use_elector`. It is the only process-wide state
leaderrun keeps. A decorator given an explicit ``elector=`` ignores it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

from leaderrun.elector import LeaderElector, current_elector
from leaderrun.errors import ConfigError, NotLeaderError

log = logging.getLogger("leaderrun")

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

OnNotLeader = Literal["skip", "raise"]
"""What a ``@leader_only`` function does on a follower: return None, or raise."""


def is_leader() -> bool:
    """Whether the current elector leads now; False when there is none.

    See :meth:`LeaderElector.is_leader` for what true means under faults.
    """
    elector = current_elector()
    return elector is not None and elector.is_leader()


class SkippingDecorator(Protocol):
    """What ``leader_only(on_not_leader="skip")`` returns: the result may be None."""

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R | None]]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R | None]: ...


@overload
def leader_only(
    func: Callable[P, Coroutine[Any, Any, R]], /
) -> Callable[P, Coroutine[Any, Any, R | None]]: ...


@overload
def leader_only(func: Callable[P, R], /) -> Callable[P, R | None]: ...


@overload
def leader_only(
    *, elector: LeaderElector | None = None, on_not_leader: Literal["skip"] = "skip"
) -> SkippingDecorator: ...


@overload
def leader_only(
    *, elector: LeaderElector | None = None, on_not_leader: Literal["raise"]
) -> Callable[[F], F]: ...


def leader_only(
    func: Callable[..., Any] | None = None,
    /,
    *,
    elector: LeaderElector | None = None,
    on_not_leader: OnNotLeader = "skip",
) -> Any:
    """Run the decorated function only while this process leads.

    Works on plain and ``async`` functions, and on methods. Leadership is
    checked once, when the call starts (for a coroutine: when it is awaited).
    A call that started counts as leader-only work in flight
    (:meth:`LeaderElector.leading`): ``release()`` and ``stop()`` release the
    lease only after it returned (waiting at most ``kill_grace_s``), and after
    a loss the lease runs out no sooner than ``kill_grace_s`` after
    ``is_leader()`` turned false. Code that runs for longer should check
    ``is_leader()`` again as it goes, or stop when ``on_lost`` is called. Use
    it bare (``@leader_only``) or with arguments.

    Args:
        func: the function, when used bare.
        elector: the elector to ask; default the current one at each call.
        on_not_leader: ``"skip"`` returns None without running the function;
            ``"raise"`` raises :class:`leaderrun.errors.NotLeaderError`.

    Raises:
        ConfigError: ``on_not_leader`` is neither "skip" nor "raise".
    """
    if on_not_leader not in ("skip", "raise"):
        raise ConfigError(f"on_not_leader={on_not_leader!r} must be 'skip' or 'raise'")

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        return _wrap(function, elector, on_not_leader)

    return decorate if func is None else decorate(func)


def _wrap(
    func: Callable[..., Any], elector: LeaderElector | None, mode: OnNotLeader
) -> Callable[..., Any]:
    name = getattr(func, "__qualname__", repr(func))

    def refuse(asked: LeaderElector | None) -> None:
        """Not leading: raise, or note the skip (the wrapper returns None)."""
        if mode == "raise":
            lock = "" if asked is None else f" of {str(asked.lock)!r}"
            raise NotLeaderError(
                f"not the leader{lock}; {name} did not run"
                + ("" if asked is not None else " (no elector was started)")
            )
        log.debug("not the leader; skipping %s", name)

    @contextlib.contextmanager
    def turn() -> Iterator[bool]:
        """Whether this call may run; if so, it runs inside elector.leading().

        release() and stop() wait for such calls (up to the kill grace) before
        they let another replica in.
        """
        asked = elector if elector is not None else current_elector()
        if asked is None:
            refuse(None)
            yield False
            return
        with asked.leading() as token:
            if token is None:
                refuse(asked)
            yield token is not None

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with turn() as leading:
                return await func(*args, **kwargs) if leading else None

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with turn() as leading:
            return func(*args, **kwargs) if leading else None

    return wrapper
