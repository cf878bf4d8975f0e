"""Errors raised by the time layer.

Every error is a `TrueTimeError`. The `retryable` flag tells a caller what to do with it:
retryable errors describe a condition that passes by itself (the clock comes back within its
bound, a fresh batch is fetched, the oracle comes back), so the caller may back off and try
the whole operation again; terminal errors describe bad input or exhausted configuration and
will fail the same way on every retry.
"""

from __future__ import annotations


class TrueTimeError(Exception):
    """Base class of every error the time layer raises.

    Terminal unless a subclass says otherwise: retrying will not help.
    """

    retryable: bool = False


class UncertaintyExceeded(TrueTimeError):
    """The clock's uncertainty is above the configured bound, so the node refuses to issue
    timestamps.

    A timestamp handed out now could be below true time, breaking real-time order; refusing is
    the safe choice (DESIGN section 3: a node whose clock is off by more than the bound stops
    serving rather than break consistency). Retryable: the condition clears when the clock
    source is synchronised again.
    """

    retryable = True

    def __init__(self, uncertainty_ns: int, bound_ns: int) -> None:
        self.uncertainty_ns = uncertainty_ns
        self.bound_ns = bound_ns
        super().__init__(
            f"clock uncertainty {uncertainty_ns / 1000:.3f} us exceeds the bound "
            f"{bound_ns / 1000:.3f} us; this node refuses to issue timestamps until its clock "
            f"is back within the bound"
        )

    def __reduce__(self) -> tuple[type[UncertaintyExceeded], tuple[int, int]]:
        # Exceptions pickle their args; ours has a two-int constructor, not a message one.
        return (type(self), (self.uncertainty_ns, self.bound_ns))


class BatchExpired(TrueTimeError):
    """A timestamp batch outlived its TTL before it could be used.

    Using it would risk timestamps below true time. Retryable: fetch a new batch.
    """

    retryable = True


class OracleUnavailable(TrueTimeError):
    """The timestamp oracle could not be reached or did not answer in time.

    Raised by the transport bindings, never by the I/O-free core. Retryable.
    """

    retryable = True


class SlotsExhausted(TrueTimeError):
    """Every coordinator slot of an oracle is taken.

    Terminal for this oracle: slots are stable per coordinator name and are never reclaimed
    while the oracle runs, so the deployment needs another oracle (or fewer coordinators).
    """
