"""What a training run logged to TensorBoard, read back from its OUT/logs event files."""

from collections import Counter
from pathlib import Path


def logged_steps(out: Path, tag: str) -> Counter:
    """step → how many times ``tag`` (a scalar or an image) was logged at that step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = Counter()
    for path in sorted((Path(out) / "logs").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps.update(event.step for value in event.summary.value if value.tag == tag)
    return steps


def logged_scalars(out: Path, tag: str) -> dict[int, float]:
    """step → the value of the scalar ``tag`` logged at that step (the last one, were it logged twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    values = {}
    for path in sorted((Path(out) / "logs").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = (
                        value.simple_value if value.HasField("simple_value") else value.tensor.float_val[0]
                    )
    return values
