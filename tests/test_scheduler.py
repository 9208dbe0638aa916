"""The drain-by-model policy, as pure code: no loop, no clock, no I/O."""

from foreman.scheduler import Decision, ModelQueue, Reason, pick


def q(key: str, waiting: int, oldest: str) -> ModelQueue:
    return ModelQueue(key, waiting, oldest)


def test_nothing_waiting_means_no_decision() -> None:
    """An empty queue gives the worker nothing to do."""
    assert pick([], {"a:latest"}) is None
    assert pick([q("a:latest", 0, "01")], set()) is None


def test_resident_model_is_served_before_an_older_job_elsewhere() -> None:
    """Work for the loaded model drains first, even when another model waited longer."""
    queues = [q("old:latest", 1, "01A"), q("hot:latest", 3, "01B")]
    assert pick(queues, {"hot:latest"}) == Decision("hot:latest", Reason.RESIDENT)


def test_drained_resident_model_hands_over_to_the_oldest_job() -> None:
    """With nothing left for the loaded model, the oldest job overall decides the swap."""
    queues = [q("b:latest", 5, "01C"), q("c:latest", 1, "01B")]
    decision = pick(queues, {"a:latest"})
    assert decision == Decision("c:latest", Reason.DRAINED)
    assert decision is not None and decision.swap


def test_nothing_loaded_is_a_cold_start() -> None:
    """A cold Ollama loads the model of the oldest job."""
    assert pick([q("b:latest", 1, "01B"), q("a:latest", 1, "01A")], set()) == Decision(
        "a:latest", Reason.COLD
    )


def test_among_several_resident_models_the_oldest_job_goes_first() -> None:
    """Every resident model is free to serve; age breaks the tie."""
    queues = [q("a:latest", 1, "01B"), q("b:latest", 1, "01A"), q("c:latest", 1, "009")]
    assert pick(queues, {"a:latest", "b:latest"}) == Decision("b:latest", Reason.RESIDENT)


def test_resident_pick_costs_no_swap() -> None:
    """Serving a loaded model is not a swap."""
    assert not Decision("a:latest", Reason.RESIDENT).swap
