"""A site's round secrets: the client state of its ``secret_state`` parts (SecAgg+'s keys,
seed and received shares, a CKKS key holder's secret key), kept on the site between the
stages of one round and never sent to the server.

In a simulation the round loop carries such state between a round's stages and never stores
it. Deployed, it must not even pass through the server: the site merges its own copy into
each task (whatever the server sent under a secret namespace is ignored) and strips it from
each answer. A task of another round or run, or a new session with the server (which may
have restarted), discards it; a part whose secrets are gone declines its later stages, so
the site drops out of that round, which the protocols survive. The client state of a
``site_state`` part (a delta downlink's last model) is kept the same way, but across the
rounds and sessions of a run.

Example:
    >>> import numpy as np, torch
    >>> from potluck.core.message import Message
    >>> from potluck.core.records import Reply, StageJob
    >>> kept = RoundSecrets({"transforms.0.secagg"})
    >>> reply = Reply(Message(), {"transforms.0.secagg": {"b": torch.ones(2)}})
    >>> kept.keep("run", 3, reply).state
    {}
    >>> job = StageJob("train", 3, Message(), np.array([0]), (Message(),), ({},))
    >>> sorted(kept.fill("run", job).states[0]["transforms.0.secagg"])
    ['b']
    >>> later = StageJob("train", 4, Message(), np.array([0]), (Message(),), ({},))
    >>> dict(kept.fill("run", later).states[0])  # the next round: forgotten
    {}
"""

from __future__ import annotations

from collections.abc import Iterable

from potluck.core.records import Reply, StageJob, State


class RoundSecrets:
    """The state of the parts named in ``namespaces`` for one (run, round), and of those
    named in ``lasting`` (``site_state`` parts: a delta downlink's last model) for one run,
    across rounds and sessions: the server never holds either.

    Example:
        >>> import numpy as np, torch
        >>> from potluck.core.message import Message
        >>> kept = RoundSecrets((), lasting={"downlink.0.delta"})
        >>> reply = Reply(Message(), {"downlink.0.delta": {"w": torch.ones(2)}})
        >>> kept.keep("run", 3, reply).state
        {}
        >>> kept.forget()  # a new session: the site still holds its last model
        >>> job = StageJob("train", 5, Message(), np.array([0]), (Message(),), ({},))
        >>> sorted(kept.fill("run", job).states[0]["downlink.0.delta"])
        ['w']
    """

    def __init__(self, namespaces: Iterable[str], lasting: Iterable[str] = ()) -> None:
        self.namespaces, self.lasting = frozenset(namespaces), frozenset(lasting)
        self._round: tuple[str, int] | None = None
        self._held: dict[str, State] = {}
        self._run: str | None = None
        self._kept: dict[str, State] = {}

    def forget(self) -> None:
        """Discard every secret (a new session: the server may not be the one that sent
        the round's earlier stages)."""
        self._round, self._held = None, {}

    def fill(self, run_id: str, job: StageJob) -> StageJob:
        """``job`` (one member's) with this site's own secrets in place of anything sent under
        a secret namespace; those of an earlier round are discarded first."""
        self._enter(run_id, job.round)
        own = self.namespaces | self.lasting
        if not own:
            return job
        mine = {ns: dict(s) for ns, s in (*self._kept.items(), *self._held.items())}
        states = []
        for state in job.states:
            open_ = {ns: s for ns, s in state.items() if ns not in own}
            states.append({**open_, **mine})
        return StageJob(job.stage, job.round, job.shared, job.clients, job.payloads, tuple(states))

    def keep(self, run_id: str, round: int, reply: Reply) -> Reply:
        """``reply`` without its secret state, which this site keeps for the round."""
        self._enter(run_id, round)
        secret = {ns: dict(s) for ns, s in reply.state.items() if ns in self.namespaces}
        lasting = {ns: dict(s) for ns, s in reply.state.items() if ns in self.lasting}
        if not secret and not lasting:
            return reply
        self._held.update(secret)
        self._kept.update(lasting)
        own = self.namespaces | self.lasting
        open_ = {ns: s for ns, s in reply.state.items() if ns not in own}
        return Reply(reply.message, open_, reply.refused)

    def _enter(self, run_id: str, round: int) -> None:
        if self._run != run_id:
            self._run, self._kept = run_id, {}
        if self._round != (run_id, round):
            self._round, self._held = (run_id, round), {}
