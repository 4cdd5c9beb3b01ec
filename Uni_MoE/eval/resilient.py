"""Generation that outlives a failing sample: the runner sees only an iterator of (index, reply) over a list
of samples, as every generation engine gives, and when that iterator raises, the samples of the batch in
flight are generated one at a time so the failing one is named and the others still get their replies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from ..data.schema import Sample

Generate = Callable[[list[Sample]], Iterator[tuple[int, str]]]
Outcome = tuple[int, "str | None", "str | None"]  # (position, reply, error): exactly one of reply / error is set


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def replies_or_errors(generate: Generate, samples: list[Sample | None], todo: list[int],
                      isolate: int) -> Iterator[Outcome]:
    """(position, reply, None) for every position of ``todo`` whose generation succeeds, (position, None,
    error) for each that fails. After a failure the next ``isolate`` unfinished positions (a batch) run one by
    one, then the rest resume together, so a failure costs one batch run singly."""
    todo = list(todo)
    while todo:
        seen: set[int] = set()
        try:
            for k, reply in generate([samples[n] for n in todo]):
                seen.add(k)
                yield todo[k], reply, None
            return
        except Exception as err:  # noqa: BLE001 - any failure of one batch must not end the run
            print(f"generation failed ({describe(err)}); running the next {isolate} sample(s) one at a time",
                  file=sys.stderr)
        rest = [n for k, n in enumerate(todo) if k not in seen]
        for n in rest[:isolate]:
            try:
                for _, reply in generate([samples[n]]):
                    yield n, reply, None
            except Exception as err:  # noqa: BLE001 - recorded with the sample, the run goes on
                yield n, None, describe(err)
        todo = rest[isolate:]
