"""The handler base for outputs gathered over one engine run and written when it completes."""

from __future__ import annotations

from ignite.engine import Engine, Events


class RunCollector:
    """Attach to an ignite/MONAI engine: :meth:`reset` when a run starts, :meth:`collect` after every
    iteration (the decollated ``engine.state.batch`` and ``engine.state.output``), :meth:`write` when
    the run completes. Test reports and file predictions are such handlers."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        raise NotImplementedError

    def collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def write(self, engine: Engine) -> None:
        raise NotImplementedError
